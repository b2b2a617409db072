"""How llama-server is built and proven before use, without an AMX machine and without a build.

The AMX crash (llama.cpp issue #20824) needs an Intel CPU with AMX to show. These tests check
what decides it instead: the compiler flags of the build (with the real compiler, for a CPU
that has AMX), the cache folder each way of building gets, and the check of a binary against
stand-ins that crash, hang or answer like llama-server. Only the build step itself is mocked.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from routheon.demo import check, llama
from routheon.demo.models import DEMO_MODELS
from support import REPO

AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
OLD_FOLDER = f"llama.cpp-{llama.LLAMA_CPP_VERSION}-x86_64"  # where Routheon built it with AMX until issue 18

# stand-ins for llama-server: each prints a line of log first, as llama-server does while it loads
CRASHES = '#!/bin/sh\necho "load_tensors: loading model tensors"\nkill -SEGV $$\n'
EXITS = '#!/bin/sh\necho "error: unknown argument: --model"\nexit 3\n'


def hangs(pidfile: Path) -> str:
    """A stand-in that loads forever; it writes its pid (``exec`` keeps it) to ``pidfile``."""
    return f'#!/bin/sh\necho "llama threadpool init, n_threads = 1"\necho $$ > "{pidfile}"\nexec sleep 300\n'


def answers(starts: Path) -> str:
    """A stand-in that serves like llama-server (tests/fake_llama.py) and counts its starts."""
    return f'#!/bin/sh\necho start >> "{starts}"\nexec "{sys.executable}" "{REPO / "tests" / "fake_llama.py"}" "$@"\n'


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, x86_64, and no llama-server of the user's ($LLAMA_SERVER, PATH)."""
    monkeypatch.setenv("ROUTHEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'no-llama'}:/usr/bin:/bin")
    monkeypatch.setattr(llama, "machine", lambda: "x86_64")
    return tmp_path / "cache"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model file; the stand-ins never read it."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


Builds = list[str]


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[dict[str, str]], Builds]:
    """Replace the build step: ``builds({"portable": TEXT})`` makes each build write that stand-in."""

    def install(results: dict[str, str]) -> Builds:
        made: Builds = []

        def build(config: llama.BuildConfig, jobs: int | None = None) -> Path:
            made.append(config.name)
            return script(config.binary, results[config.name])

        monkeypatch.setattr(llama, "build", build)
        return made

    return install


# -- the build options ------------------------------------------------------------------


def flag_values(config: llama.BuildConfig, name: str) -> list[str]:
    prefix = f"-D{name}="
    return [option.removeprefix(prefix) for option in config.options if option.startswith(prefix)]


@pytest.mark.parametrize("flags", ["CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"])
def test_the_native_build_turns_every_amx_extension_off(cache: Path, flags: str) -> None:
    config = llama.native_config()
    assert flag_values(config, "GGML_NATIVE") == ["ON"]
    [value] = flag_values(config, flags)
    assert set(AMX_FLAGS) <= set(value.split())


def test_on_arm_the_native_build_gets_no_x86_flags(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "machine", lambda: "aarch64")
    assert not any("amx" in option for option in llama.native_config().options)
    assert not any("AVX" in option for option in llama.portable_config().options)


@pytest.mark.parametrize("compiler", ["cc", "c++"])
def test_the_compiler_makes_no_amx_code_with_these_flags_for_a_cpu_that_has_amx(compiler: str) -> None:
    """The build's flags as cmake puts them, before -march: ggml's AMX code needs __AMX_INT8__."""
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler}")

    def macros(*flags: str) -> str:
        language = "c++" if compiler == "c++" else "c"
        argv = [compiler, *flags, "-O3", "-march=sapphirerapids", "-dM", "-E", "-x", language, "-"]
        result = subprocess.run(argv, input="", capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"{compiler} does not know Sapphire Rapids: {result.stderr.strip()}")
        return result.stdout

    assert "__AMX_INT8__" in macros(), "without the flags this CPU gets AMX code"
    [value] = flag_values(llama.native_config(), "CMAKE_CXX_FLAGS" if compiler == "c++" else "CMAKE_C_FLAGS")
    assert "__AMX_" not in macros(*shlex.split(value))


def test_the_portable_build_uses_only_what_the_cpu_reports(cache: Path) -> None:
    config = llama.portable_config(frozenset({"sse4_2", "avx", "f16c", "avx512f", "amx_tile", "amx_int8"}))
    assert flag_values(config, "GGML_NATIVE") == ["OFF"]
    on = {option.removeprefix("-D").removesuffix("=ON") for option in config.options if option.endswith("=ON")}
    assert on == {"GGML_SSE42", "GGML_AVX", "GGML_F16C"}
    for off in ("GGML_AVX2", "GGML_FMA", "GGML_BMI2", "GGML_AVX512", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert flag_values(config, off) == ["OFF"]


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse4_2 avx2 amx_tile\n\n")
    assert llama.cpu_flags(cpuinfo) == {"fpu", "sse4_2", "avx2", "amx_tile"}
    assert llama.cpu_flags(tmp_path / "missing") == frozenset()


def test_the_cache_folder_changes_with_the_options(cache: Path) -> None:
    native = llama.native_config()
    other = llama.BuildConfig(native.name, (*native.options, "-DGGML_LTO=ON"))
    folders = {
        native.folder,
        other.folder,
        llama.portable_config(frozenset({"avx"})).folder,
        llama.portable_config(frozenset({"avx", "avx2"})).folder,
    }
    assert len(folders) == 4
    assert all(folder.parent == cache and folder.name.startswith(f"{OLD_FOLDER}-") for folder in folders)
    assert cache / OLD_FOLDER not in folders
    assert llama.native_config().folder == native.folder, "the same options, the same folder"


# -- the check of one binary ------------------------------------------------------------


def test_a_binary_killed_by_sigsegv_is_named_with_the_signal_and_its_log(cache: Path, model: Path, tmp_path: Path) -> None:
    binary = script(tmp_path / "llama-server", CRASHES)
    verdict = check.check(binary, model)
    assert not verdict.ok
    message = check.describe(verdict, model)
    assert f"llama-server {binary} failed its check" in message
    assert "it was killed by SIGSEGV" in message
    assert "load_tensors: loading model tensors" in message


def test_a_binary_that_exits_is_named_with_its_exit_code(cache: Path, model: Path, tmp_path: Path) -> None:
    verdict = check.check(script(tmp_path / "llama-server", EXITS), model)
    assert verdict.failure == "exited with code 3"
    assert "unknown argument" in check.describe(verdict, model)


def test_a_binary_that_hangs_fails_after_the_timeout_and_is_stopped(cache: Path, model: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    binary = script(tmp_path / "llama-server", hangs(pidfile))
    started = time.monotonic()
    verdict = check.check(binary, model, timeout=1.0)
    assert verdict.failure == "did not answer within 1 s and was stopped"
    assert time.monotonic() - started < 30, "the timeout bounds the check"
    assert "threadpool init" in check.describe(verdict, model)
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists(), "the hung process is gone"


def test_a_binary_that_answers_passes_and_its_verdict_is_kept(cache: Path, model: Path, tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    binary = script(tmp_path / "llama-server", answers(starts))
    assert check.check(binary, model).ok
    assert check.check(binary, model).ok
    assert starts.read_text().count("start") == 1, "the second check is the kept verdict"
    script(binary, answers(starts) + "# rebuilt\n")  # another file at the same path
    assert check.check(binary, model).ok
    assert starts.read_text().count("start") == 2, "a changed binary is checked again"


# -- which binary the demo and the tests get --------------------------------------------


def test_routheon_s_crashing_build_is_rebuilt_once_without_native_tuning(
    cache: Path, model: Path, tmp_path: Path, builds: Callable[[dict[str, str]], Builds],
    caplog: pytest.LogCaptureFixture,
) -> None:
    starts = tmp_path / "starts"
    made = builds({"native": CRASHES, "portable": answers(starts)})
    found = llama.proven_llama_server(model)
    assert found == llama.portable_config().binary
    assert made == ["native", "portable"]
    assert "was killed by SIGSEGV" in caplog.text
    assert "Instead: building llama-server once more, without native tuning" in caplog.text
    assert llama.proven_llama_server(model) == found
    assert llama.proven_llama_server(model, build_missing=False) == found
    assert made == ["native", "portable"], "no more builds"
    assert starts.read_text().count("start") == 1, "the kept verdicts decide"


def test_when_the_portable_build_fails_too_the_message_says_so(
    cache: Path, model: Path, builds: Callable[[dict[str, str]], Builds]
) -> None:
    made = builds({"native": CRASHES, "portable": EXITS})
    with pytest.raises(llama.CheckError) as failed:
        llama.proven_llama_server(model)
    assert made == ["native", "portable"]
    message = str(failed.value)
    assert str(llama.portable_config().binary) in message and "exited with code 3" in message
    assert "set LLAMA_SERVER" in message


def test_the_tests_build_nothing_and_name_the_command_that_does(
    cache: Path, model: Path, builds: Callable[[dict[str, str]], Builds]
) -> None:
    made = builds({})
    assert llama.proven_llama_server(model, build_missing=False) is None
    script(llama.native_config().binary, CRASHES)
    with pytest.raises(llama.CheckError, match=r"(?s)killed by SIGSEGV.*`make demo-assets` builds one"):
        llama.proven_llama_server(model, build_missing=False)
    assert made == []


@pytest.mark.parametrize("where", ["LLAMA_SERVER", "PATH"])
def test_a_user_s_failing_binary_is_never_replaced(
    cache: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    builds: Callable[[dict[str, str]], Builds], where: str,
) -> None:
    made = builds({"native": answers(tmp_path / "starts")})
    binary = script(tmp_path / "no-llama" / "llama-server", CRASHES)
    if where == "LLAMA_SERVER":
        monkeypatch.setenv("LLAMA_SERVER", str(binary))
        advice = "unset LLAMA_SERVER to let Routheon build one"
    else:
        advice = f"take {binary} off PATH to let Routheon build one"
    with pytest.raises(llama.CheckError) as failed:
        llama.proven_llama_server(model)
    message = str(failed.value)
    assert f"llama-server {binary} failed its check" in message and "killed by SIGSEGV" in message
    assert advice in message
    assert made == []
    assert binary.read_text() == CRASHES


def test_a_user_s_working_binary_is_used(cache: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         builds: Callable[[dict[str, str]], Builds]) -> None:
    made = builds({})
    binary = script(tmp_path / "mine" / "llama-server", answers(tmp_path / "starts"))
    monkeypatch.setenv("LLAMA_SERVER", str(binary))
    assert llama.proven_llama_server(model) == binary
    assert made == []


def test_a_build_in_the_old_cache_folder_is_never_used(
    cache: Path, model: Path, tmp_path: Path, builds: Callable[[dict[str, str]], Builds]
) -> None:
    starts = tmp_path / "starts"
    old = script(cache / OLD_FOLDER / "bin" / "llama-server", answers(starts))
    made = builds({"native": answers(starts)})
    assert llama.proven_llama_server(model, build_missing=False) is None
    assert llama.stale_builds() == [old.parent.parent]
    assert llama.proven_llama_server(model) == llama.native_config().binary
    assert made == ["native"]


def test_the_demo_stops_with_one_message_for_a_crashing_llama_server(tmp_path: Path) -> None:
    binary = script(tmp_path / "llama-server", CRASHES)
    cache = tmp_path / "cache"
    for spec in DEMO_MODELS:
        spec_path = cache / "models" / spec.filename
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_bytes(b"GGUF")
    result = subprocess.run(
        [sys.executable, "-m", "routheon.demo", "--prepare"],
        env={"PATH": "/usr/bin:/bin", "ROUTHEON_CACHE": str(cache), "LLAMA_SERVER": str(binary)},
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=120,
    )
    assert result.returncode == 1
    assert f"routheon demo: error: llama-server {binary} failed its check" in result.stderr
    assert "was killed by SIGSEGV" in result.stderr and "unset LLAMA_SERVER" in result.stderr
    assert "Traceback" not in result.stderr
