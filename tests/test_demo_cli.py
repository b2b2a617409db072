"""`python -m routheon.demo` as a user runs it: the seed's requests, stop/start, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from demo_process import Output, children
from routheon.demo.models import DEMO_MODELS
from routheon.loopback import free_port
from routheon.probe import model_ids
from routheon.supervisor import eventually
from support import REPO, request

pytestmark = [pytest.mark.llama, pytest.mark.traefik]

SEED_CHAT = {
    "model": "TinyLlama_Chat",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Write a one-line Python function that prints hello."},
    ],
    "max_tokens": 16,
}


def _chat(url: str, key: str) -> dict:
    """The seed's chat request with ``key``; the answer must be a 200."""
    headers = {"Authorization": f"Bearer {key}"}
    reply = request(f"{url}/v1/chat/completions", method="POST", headers=headers, body=SEED_CHAT, timeout=120)
    assert reply.status == 200, reply.body
    return reply.json()


def test_demo_serves_the_seed_requests_and_ctrl_c_stops_everything(tmp_path: Path, llama_server: Path) -> None:
    if not all(spec.cached_path().is_file() for spec in DEMO_MODELS):
        pytest.skip("the demo models are missing: run `make demo-assets` first")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # as when a script starts it with `&`: SIGINT arrives ignored, and Ctrl-C must still work
    proc = subprocess.Popen(
        [sys.executable, "-m", "routheon.demo", "--port", str(port), "--workdir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        output = Output(proc)
        printed = output.until("Ctrl-C stops everything")
        assert f"curl {url}/v1/models" in printed
        started = children(proc.pid)
        assert len(started) == 4, "two llama-servers, routheon-server and Traefik"

        for key in ("API_KEY-1", "API_KEY-2"):
            answer = _chat(url, key)
            assert answer["choices"][0]["message"]["content"].strip()
        assert len(model_ids(url)) == 2
        assert len(model_ids(url, "API_KEY-1")) == 1
        stats = request(f"{url}/stats", timeout=10).json()
        assert "memory" in stats and "system" not in stats, "the demo shows only a subset of /stats"

        assert proc.stdin is not None
        proc.stdin.write("stop llama-server-2\n")
        proc.stdin.flush()
        output.until("llama-server-2 stopped", timeout=30)
        assert eventually(lambda: len(model_ids(url)) == 1)
        proc.stdin.write("start llama-server-2\n")
        proc.stdin.flush()
        output.until("llama-server-2 started", timeout=120)
        assert _chat(url, "API_KEY-2")["choices"], "usable once 'started' shows"
        assert eventually(lambda: len(model_ids(url)) == 2)

        current = children(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        for pid in started | current:
            assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived the demo"
        assert model_ids(url) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
