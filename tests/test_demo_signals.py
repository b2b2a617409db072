"""The demo's signal handling, with a stand-in for llama-server (tests/fake_llama.py).

A user stops the demo with Ctrl-C, a script with ``kill``, make by passing its own SIGTERM
on; whichever way, every process the demo started must be gone when it exits, and it must
exit without a traceback. The real routheon-server and Traefik run; only the models are fake.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo_process import Output, children
from routheon.demo.models import DEMO_MODELS
from routheon.loopback import free_port
from routheon.probe import model_ids
from support import REPO

# one worker at a time: each demo asks for the same preferred ports (8011, 8012, 9080)
pytestmark = [pytest.mark.traefik, pytest.mark.xdist_group("demo-ports")]

Demo = Callable[..., tuple[subprocess.Popen[str], Output, set[int]]]


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Demo]:
    """Start the demo until it is up: ``demo(ignore_sigint=True)`` as a script's ``... &`` would."""
    fake = tmp_path / "llama-server"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_llama.py"}" "$@"\n')
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    for spec in DEMO_MODELS:
        monkeypatch.setenv("ROUTHEON_CACHE", str(cache))
        spec.cached_path().parent.mkdir(parents=True, exist_ok=True)
        spec.cached_path().write_bytes(b"GGUF")
    monkeypatch.setenv("LLAMA_SERVER", str(fake))
    started: list[subprocess.Popen[str]] = []

    def start(ignore_sigint: bool = False) -> tuple[subprocess.Popen[str], Output, set[int]]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "routheon.demo", "--port", str(port), "--workdir", str(tmp_path / "demo")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )
        started.append(proc)
        output = Output(proc)
        output.until("Ctrl-C stops everything", timeout=60)
        assert len(model_ids(f"http://127.0.0.1:{port}")) == 2
        pids = children(proc.pid)
        assert len(pids) == 4, "two llama-servers, routheon-server and Traefik"
        return proc, output, pids

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_all_gone(pids: set[int]) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived the demo"


def test_sigint_stops_a_demo_that_inherited_it_ignored(demo: Demo) -> None:
    proc, output, pids = demo(ignore_sigint=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert_all_gone(pids)
    assert "Traceback" not in output.rest()


def test_sigterm_twice_as_make_passes_it_on_stops_cleanly(demo: Demo) -> None:
    proc, output, pids = demo()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert_all_gone(pids)
    printed = output.rest()
    assert "Traceback" not in printed and "every process it started has exited" in printed


def test_a_second_ctrl_c_during_the_stop_leaves_no_child_behind(demo: Demo) -> None:
    proc, output, pids = demo()
    proc.send_signal(signal.SIGINT)
    output.until("Stopping the demo", timeout=10)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert_all_gone(pids)
    assert "Traceback" not in output.rest()
