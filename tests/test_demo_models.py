"""Each demo model sees the conversation it is sent, started exactly as the demo starts it.

Gemma's file carries no chat template, and the demo's former ``--chat-template gemma`` was taken
by the pinned llama-server as the text of a Jinja template: the prompt of every request was
"gemma" (3 tokens), and Gemma's answers had nothing to do with the question.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from routheon.demo.models import DEMO_MODELS, ModelSpec
from routheon.demo.stack import Backend, Stack, StackConfig
from routheon.loopback import LOOPBACK, free_port
from routheon.supervisor import Supervisor
from support import request

pytestmark = pytest.mark.llama

SYSTEM = "You are a concise assistant."
QUESTION = "Which ocean lies between Africa and Australia?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.mark.parametrize("spec", DEMO_MODELS, ids=[spec.alias for spec in DEMO_MODELS])
def test_the_prompt_holds_the_user_s_words(spec: ModelSpec, llama_server: Path, tmp_path: Path) -> None:
    if not spec.cached_path().is_file():
        pytest.skip(f"{spec.filename} is missing: run `make demo-assets` first")
    backend = Backend("llama-server-1", "key", spec.cached_path(), spec.alias, free_port(), spec.server_args)
    config = StackConfig(workdir=tmp_path, llama_server=llama_server, backends=(backend,), n_predict=1)
    with Supervisor(tmp_path / "logs") as supervisor:
        Stack(config, supervisor).start_backend(backend.service)
        url = f"http://{LOOPBACK}:{backend.port}"
        prompt = request(f"{url}/apply-template", "POST", body={"messages": MESSAGES}).json()["prompt"]
        assert QUESTION in prompt and SYSTEM in prompt, prompt
        words = request(f"{url}/tokenize", "POST", body={"content": f"{SYSTEM} {QUESTION}"}).json()["tokens"]
        answer = request(f"{url}/v1/chat/completions", "POST", body={"messages": MESSAGES, "max_tokens": 1}).json()
        assert answer["usage"]["prompt_tokens"] > len(words), "the request's prompt is the rendered conversation"
