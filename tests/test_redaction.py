"""No key in anything Routheon shows or logs, whatever a hand-written file does wrong.

Traefik's error texts quote what they cannot read: a rule (a Traefik v2 rule's error quotes it
twice), a regular expression, a number, a duration, a URL with its password. Routheon shows
these texts on routheon-server's /health (anyone may ask through Traefik, without a key), in
its log, and in `mapping check`, `mapping list`, `key list` and the refusals of writes. Each
broken file of the corpus that holds a key goes through all of them here, with the real Traefik.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from folder_corpus import CASES, LEAK, LEAK_TAIL, Case, folder_with
from routheon.mappings.keys import REDACTED, redact, secrets_in
from routheon.supervisor import eventually
from server_helpers import serving
from support import request, run_routheon

LEAKY = [case for case in CASES if LEAK in case.text]
VALID_KEY = "sk-valid-key-abcdefghijkl"


def _health_once_judged(folder: Path, case: Case) -> tuple[str, str]:
    """/health as JSON text once Traefik's verdict on the case is in it, and the server's log."""
    name = Path(case.file).name
    with serving(["--mappings", str(folder), "--log-level", "INFO"]) as server:
        answer: dict = {}

        def judged() -> bool:
            nonlocal answer
            answer = request(f"{server.base}/health").json()
            return answer["mappings"]["traefik"]["state"] in ("applied", "rejected") and name in json.dumps(answer)

        assert eventually(judged, timeout=30), answer
        return json.dumps(answer), server.proc.log()


def test_the_corpus_holds_the_kinds_of_broken_files_with_keys() -> None:
    assert len(LEAKY) >= 13 and {case.applied for case in LEAKY} == {True, False}


@pytest.mark.traefik
@pytest.mark.parametrize("case", LEAKY, ids=[case.name for case in LEAKY])
def test_no_output_shows_the_key_of_a_broken_file(tmp_path: Path, case: Case) -> None:
    folder = folder_with(tmp_path, case, VALID_KEY)
    health, log = _health_once_judged(folder, case)
    at = ("--mappings", str(folder))
    commands = {
        "mapping check": run_routheon("mapping", "check", "--no-connect", *at),
        "mapping list": run_routheon("mapping", "list", *at),
        "key list": run_routheon("key", "list", *at),
        "mapping add": run_routheon("mapping", "add", "--service", "new", "--port", "8012", "--model", "m", *at),
    }
    outputs = {"/health": health, "routheon-server's log": log}
    outputs |= {name: result.stdout + result.stderr for name, result in commands.items()}
    for name, output in outputs.items():
        assert LEAK_TAIL not in output, f"{name} shows the key:\n{output}"
    # still useful: which file, and that Traefik disables or rejects something
    check = outputs["mapping check"]
    assert commands["mapping check"].returncode == 1 and Path(case.file).name in check, check
    assert ("rejects the whole folder" if not case.applied else "Traefik disables it") in check, check
    assert "rejects the whole folder" in health if not case.applied else "Traefik disables it" in health


def test_redact_keeps_what_the_error_is_about() -> None:
    rule = f"HeadersRegexp(`Authorization`, `^Bearer {LEAK}$`)"
    text = f"error while parsing rule {rule}: parsing rule {rule}: unsupported function: HeadersRegexp"
    assert redact(text, {rule}) == f"error while parsing rule {REDACTED}: parsing rule {REDACTED}: unsupported function: HeadersRegexp"
    # what the routers of a file may name stays: middlewares, services, template functions
    kept = 'middleware "routheon-errors@file" does not exist; function "nofunc" not defined; node: rateLimiter'
    assert redact(kept, secrets_in(f"rule: '{rule}'")) == kept
    assert redact('parse "http://u:pw@[::1": missing', set()) == f'parse "{REDACTED}": missing'
    assert redact("url http://u:pw@host/x", set()) == "url http://***@host/x"
    assert redact("Authorization: Bearer abc", set()) == f"Authorization: Bearer {REDACTED}"
    assert secrets_in(r"HeaderRegexp(`Authorization`, `^Bearer sk\-a\.bcdef$`)") >= {"sk-a.bcdef"}
