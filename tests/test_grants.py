"""The grants file's Python side: what render_grants writes, parse_grants reads back exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from routheon.mappings.check import inspect_folder
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.grants import (
    GRANTS_FILE,
    GrantedService,
    Grants,
    KeyGrant,
    key_hash,
    key_hint,
    parse_grants,
    render_grants,
)
from routheon.mappings.verdict import ask_traefik, judged
from support import VENV_BIN
from traefik_stack import SERVER_MAPPING

KEY = "sk-test-0123456789abcdef"


def sample() -> Grants:
    grants = Grants().with_service(GrantedService("alpha", ("alpha-model", "a2")))
    grants = grants.with_service(GrantedService("beta", ("beta-model",)))
    return grants.grant(KEY, ("alpha",)).grant(KEY, ("beta",)).grant("sk-other-key-abcdefgh", ("beta",))


def test_key_hash_is_sha256_hex_and_hint_the_last_characters() -> None:
    assert key_hash(KEY) == hashlib.sha256(KEY.encode()).hexdigest()
    assert key_hint(KEY) == "cdef"
    assert key_hint("sk-x{{a") == "x??a"  # template delimiters never reach the file


def test_round_trip_and_lookups() -> None:
    grants = sample()
    text = render_grants(grants)
    assert parse_grants(text) == grants
    assert KEY not in text
    assert grants.models_of(KEY) == ("alpha-model", "a2", "beta-model")
    assert grants.by_hash(key_hash(KEY)) == grants.key(KEY)
    document = yaml.safe_load(text)
    assert document["http"]["routers"]["routheon-grants"]["priority"] == 2


def test_the_grants_are_read_as_traefik_reads_them() -> None:
    """The first document only, a template comment expanded: a second document used to refuse the file."""
    text = render_grants(sample())
    assert parse_grants("{{/* by hand */}}\n" + text + "---\nhttp: [not, read]\n") == sample()


def test_revoke_one_service_then_all() -> None:
    grants = sample().revoke(KEY, ("alpha",))
    assert grants.key(KEY) == KeyGrant(key_hash(KEY), "cdef", ("beta",))
    assert sample().revoke(KEY).key(KEY) is None
    assert parse_grants(render_grants(Grants())) == Grants()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda text: text.replace("alpha-model a2", "alpha-model alpha-model"), "declares a model twice"),
        (lambda text: text.replace("    'routheon-grants':\n      plugin", "    other:\n      plugin"), "is missing"),
        (lambda text: text.replace("http://127.0.0.1:8081", "http://10.0.0.1:8081"), "must have one server"),
        (lambda text: text.replace(" cdef ", " cd{{ "), "invalid hint"),
        (lambda text: text.replace("cdef alpha beta", "cdef alpha gamma"), "'gamma' is not declared"),
        (lambda text: text + "  [", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_with_a_reason(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        parse_grants(mutate(render_grants(sample())))


def test_invalid_input_is_refused_before_writing() -> None:
    with pytest.raises(ValueError, match="not declared"):
        Grants().grant(KEY, ("alpha",))
    with pytest.raises(ValueError, match="invalid model name"):
        Grants().with_service(GrantedService("alpha", ("two words",)))
    assert GRANTS_FILE == "routheon-grants.yml"


def write_folder(folder: Path, grants_text: str) -> None:
    """routheon-server.yml, two services as ``routheon mapping add`` writes them, and the grants."""
    folder.mkdir(mode=0o700)
    (folder / "routheon-server.yml").write_text(SERVER_MAPPING.read_text())
    for port, name in enumerate(("alpha", "beta"), start=18011):
        spec = MappingSpec(name, (f"http://127.0.0.1:{port}",), (f"sk-{name}-0123456789abcdef",))
        (folder / f"{name}.yml").write_text(render_mapping(spec))
    (folder / GRANTS_FILE).write_text(grants_text)
    for path in folder.iterdir():
        path.chmod(0o600)


@pytest.mark.traefik
def test_check_and_traefik_accept_a_folder_with_grants(tmp_path: Path) -> None:
    folder = tmp_path / "mappings"
    write_folder(folder, render_grants(sample()))
    inspected = inspect_folder(folder)
    assert inspected.findings == ()
    verdict = ask_traefik(folder, traefik=str(VENV_BIN / "traefik"))
    assert verdict.applied and all(router.enabled for router in verdict.routers), verdict.routers
    assert {"routheon-grants", "routheon-grants-models", "routheon-hop-alpha"} <= {r.name for r in verdict.routers}
    assert judged(inspected, verdict).findings == ()
    # the hop is Traefik itself, not a backend to probe
    connected = inspect_folder(folder, connect=True, timeout=0.5)
    assert not any("routheon-hop" in finding.message for finding in connected.findings)


@pytest.mark.traefik
def test_a_grants_table_the_plugin_refuses_is_reported_by_both(tmp_path: Path) -> None:
    folder = tmp_path / "mappings"
    write_folder(folder, render_grants(sample()).replace("cdef alpha beta", "cdef alpha gamma"))
    assert any("'gamma' is not declared" in finding.message for finding in inspect_folder(folder).errors)
    verdict = ask_traefik(folder, traefik=str(VENV_BIN / "traefik"))
    grants_router = next(router for router in verdict.routers if router.name == "routheon-grants")
    assert not grants_router.enabled and "gamma" in " ".join(grants_router.errors)


def test_grant_all_merges_many_keys_in_one_pass() -> None:
    keys = [f"sk-many-{index:05d}-abcdefgh" for index in range(2000)]
    grants = sample().grant_all(keys, ("alpha",)).grant_all(keys[:10], ("beta",))
    assert len(grants.keys) == 2 + 2000
    assert grants.key(keys[0]).services == ("alpha", "beta") and grants.key(keys[-1]).services == ("alpha",)
    assert grants.key(KEY) == sample().key(KEY)  # the others keep their grants
