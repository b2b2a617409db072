"""No key in anything Routheon shows or logs, whatever Traefik says about a hand-written file.

Traefik quotes what it cannot read: a rule it cannot parse ("error while parsing rule
Header(`Authorization`, `Bearer KEY`) ..."), a regular expression Go cannot compile. Those texts
reached routheon-server's /health (anyone may ask it through Traefik without a key), its log,
and every `routheon` command that prints Traefik's verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import running_server
from support import request, run_routheon

from routheon.supervisor import eventually

BACKEND = "http://127.0.0.1:9"


def key_file(router: str, rule: str) -> str:
    return (
        f"http:\n  routers:\n    {router}:\n      rule: '{rule}'\n      service: {router}\n"
        f"      entryPoints: [llama-servers]\n  services:\n    {router}:\n      loadBalancer:\n"
        f"        servers:\n          - url: {BACKEND}\n"
    )


# Each holds its own key (SECRET in it) in a form Traefik complains about, quoting the rule.
BROKEN = {
    # Traefik v2's matcher, gone in v3: the router is disabled, its rule quoted twice
    "v2-headers-regexp": key_file("v2", "HeadersRegexp(`Authorization`, `Bearer sk-SECRET-v2`)"),
    # a regular expression Go cannot compile: the rule and the expression quoted
    "bad-regexp": key_file("re", "HeaderRegexp(`Authorization`, `^Bearer sk-SECRET-re(`)"),
    # double quotes inside the rule, an unknown matcher
    "double-quoted": key_file("dq", 'Headers("Authorization", "Bearer sk-SECRET-dq")'),
    # a key that is also a regexp's literal, with a rule Traefik cannot parse at all
    "unparsable": key_file("up", "Header(`Authorization`, `Bearer sk-SECRET-up`) &&"),
    # a value of the wrong type: YAML's error quotes the value
    "wrong-type": key_file("wt", "Header(`Authorization`, `Bearer sk-SECRET-wt1`)").replace(
        "      service: wt\n", "      service: wt\n      priority: 'Bearer sk-SECRET-wt2'\n"
    ),
}


@pytest.fixture(params=sorted(BROKEN))
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    folder = tmp_path / "mappings"
    folder.mkdir(mode=0o750)
    path = folder / f"{request.param}.yml"
    path.write_text(BROKEN[request.param])
    path.chmod(0o640)
    return folder


def test_no_command_shows_a_key_traefik_quotes(folder: Path, tmp_path: Path) -> None:
    outputs = [
        run_routheon("mapping", "check", "--mappings", str(folder)),
        run_routheon("mapping", "list", "--mappings", str(folder)),
        run_routheon("key", "list", "--mappings", str(folder)),
        # a write in such a folder: refused or written, it prints Traefik's verdict either way
        run_routheon("mapping", "add", "--service", "other", "--url", BACKEND, "--key", "sk-new-0123456789abcdef",
                     "--mappings", str(folder)),
    ]
    said = "\n".join(result.stdout + result.stderr for result in outputs)
    assert "Traefik" in said  # Traefik was asked: its verdict is what could hold the key
    assert "SECRET" not in said, said


def test_health_and_the_servers_log_show_no_key(folder: Path, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--mappings", str(folder), "--log-level", "DEBUG"]) as server:
        assert eventually(lambda: request(f"{server.base}/health").json()["mappings"]["traefik"]["state"] != "checking")
        health = request(f"{server.base}/health").body.decode()
        assert "SECRET" not in health, health
        # Traefik has a complaint for each of these files, and /health passes it on (redacted)
        assert "Traefik" in health or "(redacted)" in health or "<rule>" in health
        server.proc.stop()
    assert "SECRET" not in server.proc.log()


def test_redaction_keeps_what_says_what_to_fix() -> None:
    from routheon.mappings.verdict import redact

    said = redact(
        'error while parsing rule Header(`Authorization`, `Bearer k`): middleware "routheon-errors@file" does not exist',
        ["Header(`Authorization`, `Bearer k`)"],
    )
    assert said == 'error while parsing rule <rule>: middleware "routheon-errors@file" does not exist'
    assert redact("cannot unmarshal !!str `Bearer abc` into int") == "cannot unmarshal !!str (redacted) into int"
    assert redact("got Authorization: bearer abc.def") == "got Authorization: bearer (redacted)"
