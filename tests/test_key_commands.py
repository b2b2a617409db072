"""`routheon key add/remove/list` and `mapping add --model`, run in-process: what the grants file
and the key files say after each command (the data plane itself: tests/test_model_routing*.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from routheon.mappings.folder import read_folder
from routheon.mappings.grants import GRANTS_FILE, key_hash
from routheon.mappings.store import read_grants
from support import REPO, run_routheon

BOTH = "sk-both-0123456789abcdef"
OLD = "sk-old-gemma-0123456789"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with routheon-server.yml and two services declaring their models."""
    monkeypatch.setenv("ROUTHEON_MAPPINGS", str(tmp_path))
    monkeypatch.delenv("ROUTHEON_BACKUPS", raising=False)
    shutil.copy(REPO / "traefik" / "mappings" / "routheon-server.yml", tmp_path)
    return tmp_path


def routheon(*args: str) -> str:
    result = run_routheon(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def services() -> None:
    routheon("mapping", "add", "--service", "smol", "--port", "8011", "--model", "SmolLM2", "--model", "TinyLlama_Chat")
    routheon("mapping", "add", "--service", "gemma", "--port", "8012", "--model", "gemma-3-270m")


def test_a_key_granted_two_services_may_use_the_models_of_both(folder: Path) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    grants = read_grants(folder)
    assert grants.models_of(BOTH) == ("SmolLM2", "TinyLlama_Chat", "gemma-3-270m")
    text = (folder / GRANTS_FILE).read_text()
    assert BOTH not in text and key_hash(BOTH) in text  # stored hashed
    out = routheon("key", "list")
    assert "...cdef" in out and "smol,gemma" in out and "SmolLM2,TinyLlama_Chat,gemma-3-270m" in out
    assert BOTH not in out


def test_grants_are_written_before_routheon_server_yml_is_in_the_folder(folder: Path) -> None:
    """Files arrive in any order: the grants' /v1/models router waits for routheon-server.yml, with a warning."""
    (folder / "routheon-server.yml").unlink()
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    assert read_grants(folder).models_of(BOTH) == ("SmolLM2", "TinyLlama_Chat", "gemma-3-270m")
    checked = run_routheon("mapping", "check", "--no-connect")
    assert checked.returncode == 0, checked.stdout
    assert "routheon-server.yml is not in the folder, so /v1/models with a granted key" in checked.stdout


def test_granting_never_revokes_and_revoking_one_service_keeps_the_other(
    folder: Path,
) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol")
    routheon("key", "add", BOTH, "--service", "gemma")
    assert read_grants(folder).key(BOTH).services == ("smol", "gemma")
    routheon("key", "remove", BOTH, "--service", "smol")
    assert read_grants(folder).models_of(BOTH) == ("gemma-3-270m",)
    routheon("key", "remove", BOTH)
    assert read_grants(folder).key(BOTH) is None
    result = run_routheon("key", "remove", BOTH)
    code, err = result.returncode, result.stderr
    assert code == 1 and "granted nothing" in err


def test_many_keys_at_once_from_a_file(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    services()
    keys = [f"sk-user-{number:04d}-0123456789abcdef" for number in range(50)]
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("\n".join(keys) + "\n")
    routheon("key", "add", "--key-file", str(key_file), "--service", "gemma")
    assert all(read_grants(folder).models_of(key) == ("gemma-3-270m",) for key in keys)


def test_a_key_from_a_key_file_moves_into_the_grants_with_its_service(
    folder: Path,
) -> None:
    services()
    routheon("mapping", "add", "--service", "gemma", "--port", "8012", "--key", OLD, "--model", "gemma-3-270m", "--replace")
    assert [mapping.keys() for mapping in read_folder(folder).files if mapping.path.name == "gemma.yml"] == [[OLD]]
    routheon("key", "add", OLD, "--service", "smol")
    assert read_grants(folder).key(OLD).services == ("gemma", "smol")
    gemma = next(mapping for mapping in read_folder(folder).files if mapping.path.name == "gemma.yml")
    assert gemma.keys() == [] and [service.name for service in gemma.services] == ["gemma"]


def test_several_services_need_declared_models(folder: Path) -> None:
    routheon("mapping", "add", "--service", "plain", "--port", "8013", "--key", OLD)
    services()
    result = run_routheon("key", "add", OLD, "--service", "smol")
    code, err = result.returncode, result.stderr
    assert code == 1 and "'plain' declares no model" in err and "--model" in err
    assert read_grants(folder).key(OLD) is None


def test_unknown_services_and_missing_keys_are_one_line_errors(folder: Path) -> None:
    services()
    result = run_routheon("key", "add", BOTH, "--service", "nope")
    code, err = result.returncode, result.stderr
    assert code == 1 and "no mapping file defines service 'nope'" in err and "Traceback" not in err
    result = run_routheon("key", "remove")
    code, err = result.returncode, result.stderr
    assert code == 1 and "give the keys" in err


def test_removing_a_service_takes_it_from_every_key(folder: Path) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    routheon("key", "add", OLD, "--service", "smol")
    routheon("mapping", "remove", "--service", "smol")
    grants = read_grants(folder)
    assert grants.service("smol") is None and grants.key(BOTH).services == ("gemma",) and grants.key(OLD) is None


def test_mapping_remove_key_revokes_a_granted_key(folder: Path) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol")
    routheon("mapping", "remove", "--key", BOTH)
    assert read_grants(folder).key(BOTH) is None


def test_key_add_generates_a_key_when_none_is_given(folder: Path) -> None:
    services()
    out = routheon("-q", "key", "add", "--service", "gemma")
    (generated,) = out.split()
    assert read_grants(folder).models_of(generated) == ("gemma-3-270m",)


def test_mapping_list_shows_granted_services_and_files_without_keys(folder: Path) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    rows = [line.split()[:2] for line in routheon("mapping", "list").splitlines()[1:]]
    assert ["smol", "-"] in rows and ["smol", "1"] in rows and ["gemma", "1"] in rows
    assert not any(name.startswith("routheon-hop") for name, _ in rows)


def test_the_grants_name_the_hop_port_of_traefiks_static_configuration(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = tmp_path_factory.mktemp("etc") / "traefik.yml"
    config.write_text(
        "entryPoints:\n  llama-servers:\n    address: ':8080'\n  routheon-hop:\n    address: '127.0.0.1:18081'\n"
    )
    services()
    assert read_grants(folder).hop_port == 8081
    routheon("key", "add", BOTH, "--service", "smol", "--traefik-config", str(config))
    assert read_grants(folder).hop_port == 18081


def test_a_key_of_64_hex_digits_is_a_key_not_a_hash(folder: Path) -> None:
    hex_key = "0123456789abcdef" * 4  # what `openssl rand -hex 32` gives
    services()
    routheon("key", "add", hex_key, "--service", "smol", "--service", "gemma")
    assert read_grants(folder).key(hex_key) is not None
    assert run_routheon("mapping", "add", "--service", "other", "--port", "8013", "--key", hex_key).returncode == 1
    routheon("key", "remove", hex_key)
    assert read_grants(folder).key(hex_key) is None and read_grants(folder).keys == ()


def test_revoking_a_service_the_key_does_not_have_fails(folder: Path) -> None:
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    result = run_routheon("key", "remove", BOTH, "--service", "smoll")
    assert result.returncode == 1 and "'smoll'" in result.stderr and "nothing was revoked" in result.stderr
    assert read_grants(folder).key(BOTH).services == ("smol", "gemma")


def test_declaring_models_keeps_the_keys_the_file_routes_at_that_moment(folder: Path) -> None:
    routheon("mapping", "add", "--service", "smol", "--port", "8011", "--key", OLD)
    routheon("mapping", "add", "--service", "smol", "--port", "8011", "--model", "SmolLM2")
    smol = next(mapping for mapping in read_folder(folder).files if mapping.path.name == "smol.yml")
    assert smol.keys() == [OLD] and read_grants(folder).service("smol").models == ("SmolLM2",)


def test_a_grant_is_refused_where_traefik_has_no_loopback_hop_and_a_revocation_is_not(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A static file without routheon-hop disables every hop router; one on every interface lets
    anybody name a service in the header it trusts. Both used to pass without a word."""
    etc = tmp_path_factory.mktemp("etc")
    (etc / "hop.yml").write_text("entryPoints:\n  llama-servers: {address: ':8080'}\n  routheon-hop: {address: '127.0.0.1:9999'}\n")
    (etc / "nohop.yml").write_text("entryPoints:\n  llama-servers: {address: ':8080'}\n")
    (etc / "open.yml").write_text("entryPoints:\n  llama-servers: {address: ':8080'}\n  routheon-hop: {address: ':27181'}\n")
    (etc / "any.yml").write_text("entryPoints:\n  routheon-hop: {address: '0.0.0.0:27181'}\n  llama-servers: {address: ':8080'}\n")
    routheon("mapping", "add", "--service", "smol", "--port", "8011", "--model", "A", "--traefik-config", str(etc / "hop.yml"))
    routheon("key", "add", OLD, "--service", "smol", "--traefik-config", str(etc / "hop.yml"))
    before = (folder / GRANTS_FILE).read_text()
    for config, words in (("nohop.yml", "has no routheon-hop entry point"), ("open.yml", "listens on ':27181' (every interface)"),
                          ("any.yml", "listens on '0.0.0.0:27181' (every interface)")):
        for command in (["key", "add", BOTH, "--service", "smol"],
                        ["mapping", "add", "--service", "smol", "--port", "8011", "--model", "B"]):
            result = run_routheon(*command, "--traefik-config", str(etc / config))
            assert result.returncode == 1 and "routheon: error: nothing was written:" in result.stderr, result.stderr
            assert words in result.stderr and str(etc / config) in result.stderr, result.stderr
        assert (folder / GRANTS_FILE).read_text() == before
    # a revocation goes through, keeping the port, with a warning
    result = run_routheon("key", "remove", OLD, "--traefik-config", str(etc / "open.yml"))
    assert result.returncode == 0 and "warning:" in result.stderr and "keeps the hop port" in result.stderr
    assert read_grants(folder).key(OLD) is None and read_grants(folder).hop_port == 9999


def test_check_reports_a_grants_file_that_sends_elsewhere_than_traefiks_hop(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Grants written without --traefik-config name 127.0.0.1:8081; check with a traefik.yml whose hop
    is elsewhere said ok. `mapping upgrade` with that file moves them onto Traefik's port."""
    services()
    routheon("key", "add", BOTH, "--service", "smol", "--service", "gemma")
    assert read_grants(folder).hop_port == 8081
    etc = tmp_path_factory.mktemp("etc")
    config = etc / "traefik.yml"
    config.write_text("entryPoints:\n  llama-servers: {address: ':8080'}\n  routheon-hop: {address: '127.0.0.1:27181'}\n")
    unchecked = run_routheon("mapping", "check", "--no-connect")
    assert unchecked.returncode == 0
    assert "routheon-grants.yml: warning: sends granted requests to 127.0.0.1:8081, unchecked" in unchecked.stdout
    checked = run_routheon("mapping", "check", "--no-connect", "--traefik-config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert (
        f"routheon-grants.yml: error: sends granted requests to 127.0.0.1:8081, but the routheon-hop entry point of"
        f" {config} listens on 127.0.0.1:27181"
    ) in checked.stdout
    assert f"routheon mapping upgrade --traefik-config {config}" in checked.stdout
    listed = run_routheon("key", "list", "--traefik-config", str(config))
    assert listed.returncode == 1 and "listens on 127.0.0.1:27181" in listed.stderr
    routheon("mapping", "upgrade", "--traefik-config", str(config))
    assert read_grants(folder).hop_port == 27181 and read_grants(folder).models_of(BOTH)
    assert run_routheon("mapping", "check", "--no-connect", "--traefik-config", str(config)).returncode == 0
    config.write_text("entryPoints:\n  llama-servers: {address: ':8080'}\n  routheon-hop: {address: ':27181'}\n")
    exposed = run_routheon("mapping", "check", "--no-connect", "--traefik-config", str(config))
    assert exposed.returncode == 1 and f"{config}: error: " in exposed.stdout and "(every interface)" in exposed.stdout



# Hand-edited key files that Traefik applies and `mapping check` passes: Traefik reads only the
# first YAML document and expands a template comment to nothing. The store used to re-read them
# with yaml.safe_load (ComposerError, ParserError tracebacks): the key stayed routed.
HAND_EDITS = {
    "second document": lambda text: text + "---\nhttp:\n  routers: [not, what, traefik, reads]\n",
    "template comment": lambda text: "{{/* edited by hand */}}\n" + text,
}


@pytest.mark.parametrize("command", ["mapping remove --key", "key add"])
@pytest.mark.parametrize("edit", HAND_EDITS, ids=list(HAND_EDITS))
def test_a_key_leaves_a_hand_edited_file_that_check_passes(folder: Path, command: str, edit: str) -> None:
    services()
    routheon("mapping", "add", "--service", "gemma", "--port", "8012", "--key", OLD, "--key", BOTH, "--replace")
    gemma = folder / "gemma.yml"
    gemma.write_text(HAND_EDITS[edit](gemma.read_text()))
    checked = run_routheon("mapping", "check", "--no-connect")
    assert checked.returncode == 0 and "applies this folder" in checked.stderr, checked.stdout + checked.stderr
    if command == "key add":
        routheon("key", "add", OLD, "--service", "smol")
        assert read_grants(folder).key(OLD).services == ("gemma", "smol")
    else:
        routheon("mapping", "remove", "--key", OLD)
        assert read_grants(folder).key(OLD) is None
    (left,) = [mapping for mapping in read_folder(folder).files if mapping.path == gemma]
    assert left.keys() == [BOTH]
