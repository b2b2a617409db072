"""The routheon command and create-mapping.sh on a mappings folder (no Traefik needed).

The command runs in this process (``run_routheon``); real processes only where several run at
once, where a hang must stay bounded, and for create-mapping.sh, which calls the command.
"""

from __future__ import annotations

import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from routheon.mappings.check import check_folder, has_errors
from routheon.mappings.folder import read_folder
from routheon.mappings.format import MAX_REQUEST_BODY_BYTES, MappingSpec, render_mapping
from routheon.mappings.grants import GrantedService, Grants, render_grants
from routheon.mappings.rules import key_clause
from samples import SEED_MAPPING, with_earlier_body_reader
from support import REPO, VENV_BIN, CliResult, run_routheon

ROUTHEON = str(VENV_BIN / "routheon")
SCRIPT = REPO / "traefik" / "create-mapping" / "create-mapping.sh"
KEY = "sk-test-0123456789abcdef"


def routheon(folder: Path, *args: str, stdin: str | None = None) -> CliResult:
    return run_routheon(*args, "--mappings", str(folder), stdin=stdin)


def routheon_process(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as its own process: for the tests whose point is several at once."""
    return subprocess.run([ROUTHEON, *args, "--mappings", str(folder)], capture_output=True, text=True, timeout=60)


def keys_by_file(folder: Path) -> dict[str, list[str]]:
    return {
        mapping.path.name: mapping.keys() for mapping in read_folder(folder).files
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_writes_a_private_file_and_is_idempotent(tmp_path: Path) -> None:
    first = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "alpha.yml"
    assert mode(path) == 0o640
    assert keys_by_file(tmp_path) == {"alpha.yml": [KEY]}
    assert read_folder(tmp_path).backend_urls() == ["http://127.0.0.1:8011"]
    again = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    assert again.returncode == 0 and "unchanged" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".routheon.lock", "alpha.yml"]


def test_add_without_key_generates_one_and_prints_it_once(tmp_path: Path) -> None:
    result = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--url", "http://127.0.0.1:8011")
    assert result.returncode == 0, result.stderr
    (key,) = result.stdout.split()
    assert keys_by_file(tmp_path) == {"alpha.yml": [key]}
    listing = routheon(tmp_path, "mapping", "list")
    assert listing.returncode == 0 and "alpha" in listing.stdout and key not in listing.stdout


def test_several_keys_and_replicas_in_one_service(tmp_path: Path) -> None:
    urls = ["http://127.0.0.1:8011", "http://127.0.0.1:8012"]
    args = ["mapping", "add", "--service", "alpha", "--url", urls[0], "--url", urls[1]]
    result = routheon(tmp_path, *args, "--key", KEY, "--key-file", "-", stdin="sk-second-0123456789abcd\n")
    assert result.returncode == 0, result.stderr
    assert keys_by_file(tmp_path) == {"alpha.yml": [KEY, "sk-second-0123456789abcd"]}
    assert read_folder(tmp_path).backend_urls() == urls
    assert "healthCheck" in (tmp_path / "alpha.yml").read_text()
    (tmp_path / "routheon-server.yml").write_text((REPO / "traefik" / "mappings" / "routheon-server.yml").read_text())
    assert check_folder(tmp_path) == []


def test_changing_a_mapping_needs_replace_and_keeps_a_private_backup(tmp_path: Path) -> None:
    assert routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY).returncode == 0
    refused = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8099", "--key", KEY)
    assert refused.returncode == 1 and "--replace" in refused.stderr
    assert "8011" in (tmp_path / "alpha.yml").read_text()
    replaced = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8099", "--key", KEY, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    (backup,) = tmp_path.glob("alpha.yml.bak.*")
    assert "8011" in backup.read_text() and "8099" in (tmp_path / "alpha.yml").read_text()
    assert mode(backup) == 0o640


def test_the_same_mapping_in_an_older_format_is_rewritten_without_replace(tmp_path: Path) -> None:
    """Re-running the same ``mapping add`` after an upgrade brings the file up to date."""
    spec = MappingSpec("alpha", ("http://127.0.0.1:8011",), (KEY,))
    unguarded = render_mapping(spec).replace(key_clause(KEY), f"Header(`Authorization`, `Bearer {KEY}`)")
    (tmp_path / "alpha.yml").write_text(unguarded)
    (tmp_path / "llama-server-1.yml").write_text(SEED_MAPPING)
    same = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    assert same.returncode == 0 and f"upgraded {tmp_path / 'alpha.yml'} (old content in" in same.stderr
    seed = routheon(tmp_path, "mapping", "add", "--service", "llama-server-1", "--port", "8011", "--key", "API_KEY-1")
    assert seed.returncode == 0, seed.stderr
    assert (tmp_path / "alpha.yml").read_text() == render_mapping(spec)
    assert "lets a second Authorization header" not in "\n".join(findings(tmp_path))
    assert len(list(tmp_path.glob("*.bak.*"))) == 2
    beta = "sk-beta-0123456789abcdef"
    (tmp_path / "beta.yml").write_text(render_mapping(MappingSpec("beta", ("http://127.0.0.1:8011",), (beta,))))
    moved = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", beta)
    assert moved.returncode == 1 and "exists with other content" in moved.stderr  # another URL, another mapping
    limited = render_mapping(spec).replace("        - 'alpha-request-body'", "        - 'alpha-request-body'\n        - 'limit'")
    (tmp_path / "alpha.yml").write_text(limited)
    kept = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    assert kept.returncode == 1 and "exists with other content" in kept.stderr  # the operator's own middleware
    (tmp_path / "alpha.yml").write_text(render_mapping(spec).replace(KEY, "sk-edited-0123456789abcdef"))
    edited = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", "sk-edited-0123456789abcdef")
    assert edited.returncode == 1 and "exists with other content" in edited.stderr  # the key never routed


def test_upgrade_rewrites_older_key_files_in_the_current_format_and_names_the_rest(tmp_path: Path) -> None:
    alpha = MappingSpec("alpha", ("http://127.0.0.1:8011",), (KEY, "sk-second-0123456789abcdef"))
    unguarded = render_mapping(alpha)
    for key in alpha.keys:
        unguarded = unguarded.replace(key_clause(key), f"Header(`Authorization`, `Bearer {key}`)")
    (tmp_path / "alpha.yml").write_text(unguarded)
    (tmp_path / "llama-server-1.yml").write_text(SEED_MAPPING)
    (tmp_path / "pattern.yml").write_text(SEED_MAPPING.replace("llama-server-1", "pattern").replace("API_KEY-1", "k.y+2$"))
    beta = render_mapping(MappingSpec("beta", ("http://127.0.0.1:8012",), ("sk-beta-0123456789abcdef",), False))
    (tmp_path / "beta.yml").write_text(beta)
    upgraded = routheon(tmp_path, "mapping", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded {tmp_path / 'alpha.yml'} (old content in alpha.yml.bak." in upgraded.stderr
    assert f"warning: left {tmp_path / 'pattern.yml'} (its rule is a regular expression" in upgraded.stderr
    assert (tmp_path / "alpha.yml").read_text() == render_mapping(alpha)
    seed = MappingSpec("llama-server-1", ("http://127.0.0.1:8011",), ("API_KEY-1",))
    assert (tmp_path / "llama-server-1.yml").read_text() == render_mapping(seed)
    assert (tmp_path / "beta.yml").read_text() == beta  # current already, without error pages as written
    assert sorted(path.name.split(".bak.")[0] for path in tmp_path.glob("*.bak.*")) == ["alpha.yml", "llama-server-1.yml"]
    assert [line for line in findings(tmp_path) if "lets a second Authorization header" in line] == [
        f"{tmp_path / 'pattern.yml'}:3: warning: router 'pattern' lets a second Authorization header ride along with"
        " one of its keys (Traefik matches any one value); re-create it with `routheon mapping add --replace`"
    ]
    again = routheon(tmp_path, "mapping", "upgrade")
    assert again.returncode == 0 and "nothing to upgrade" in again.stderr


def test_upgrade_leaves_every_file_whose_rewrite_would_change_what_reaches_what(tmp_path: Path) -> None:
    """A rewrite drops what render_mapping does not write and ranks a longer rule first: such files stay."""
    seed = SEED_MAPPING.replace("llama-server-1", "{name}").replace("API_KEY-1", "{key}")
    files = {
        # Traefik attaches a router without entry points to all of them (this once crashed upgrade)
        "everywhere.yml": seed.replace("      entryPoints:\n        - llama-servers\n", ""),
        "https.yml": seed.replace("      service: {name}\n", "      service: {name}\n      tls: {{}}\n"),
        "first.yml": seed.replace("      service: {name}\n", "      service: {name}\n      priority: 9000\n"),
        "errors.yml": seed + "  middlewares:\n    routheon-errors:\n      headers:\n        customResponseHeaders:\n"
        "          X-Errors: 'here'\n",
        "shared.yml": seed.replace("{key}", KEY),
        "sub/nested.yml": seed,
        "renamed.yml": seed.replace("{name}", "other"),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text.format(name=Path(name).stem, key=f"sk-{Path(name).stem}-0123456789abcdef"))
    taken = render_mapping(MappingSpec("taker", ("http://127.0.0.1:8012",), (KEY, "sk-taker-0123456789abcdef")))
    (tmp_path / "taker.yml").write_text(taken.replace("        - 'taker-request-body'\n", "        - 'taker-request-body'\n        - 'limit'\n", 1))
    before = {path: path.read_text() for path in tmp_path.rglob("*.yml")}
    upgraded = routheon(tmp_path, "mapping", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert {path: path.read_text() for path in tmp_path.rglob("*.yml")} == before
    left = {line.split()[2]: line for line in upgraded.stderr.splitlines() if line.startswith("warning: left ")}
    assert sorted(Path(path).relative_to(tmp_path).as_posix() for path in left) == sorted([*files, "taker.yml"])
    assert "do not all name the same one entry point" in left[str(tmp_path / "everywhere.yml")]
    assert "(http.routers.https.tls)" in left[str(tmp_path / "https.yml")]
    assert "also route in" in left[str(tmp_path / "shared.yml")]
    assert "rename it to other.yml" in left[str(tmp_path / "renamed.yml")]
    assert "in a subfolder" in left[str(tmp_path / "sub" / "nested.yml")]
    https = routheon(tmp_path, "mapping", "add", "--service", "https", "--port", "8011", "--key", "sk-https-0123456789abcdef")
    assert https.returncode == 1 and "exists with other content" in https.stderr  # without tls, HTTPS stops matching


def test_a_key_moves_between_services(tmp_path: Path) -> None:
    other = "sk-other-0123456789abcdef"
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--key", other)
    routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", "sk-beta-0123456789abcdef")
    refused = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", KEY)
    assert refused.returncode == 1 and "alpha.yml" in refused.stderr
    moved = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", KEY, "--replace")
    assert moved.returncode == 0, moved.stderr
    assert keys_by_file(tmp_path) == {"alpha.yml": [other], "beta.yml": [KEY]}
    assert mode(tmp_path / "alpha.yml") == 0o640
    assert not has_errors(check_folder(tmp_path))


def test_rotating_a_seed_mapping_retires_its_file(tmp_path: Path) -> None:
    seed = tmp_path / "llama-server-3.yml"
    seed.write_text(SEED_MAPPING.replace("llama-server-1", "llama-server-3"))
    seed.chmod(0o644)
    result = routheon(
        tmp_path, "mapping", "add", "--service", "llama-server-2", "--port", "8012", "--key", "API_KEY-1", "--replace"
    )
    assert result.returncode == 0, result.stderr
    assert not seed.exists()
    (backup,) = tmp_path.glob("llama-server-3.yml.bak.*")
    assert mode(backup) == 0o640 and backup.read_text() == SEED_MAPPING.replace("llama-server-1", "llama-server-3")
    assert keys_by_file(tmp_path) == {"llama-server-2.yml": ["API_KEY-1"]}


def test_remove_a_service_or_a_key(tmp_path: Path) -> None:
    other = "sk-other-0123456789abcdef"
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--key", other)
    routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", "sk-beta-0123456789abcdef")
    assert routheon(tmp_path, "mapping", "remove", "--key", other).returncode == 0
    assert keys_by_file(tmp_path)["alpha.yml"] == [KEY]
    assert routheon(tmp_path, "mapping", "remove", "--service", "beta").returncode == 0
    assert set(keys_by_file(tmp_path)) == {"alpha.yml"}
    missing = routheon(tmp_path, "mapping", "remove", "--key", "sk-nowhere-0123456789ab")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "alpha", "--port", "8011", "--key", "bad key"], "whitespace"),
        (["--service", "alpha", "--port", "8011", "--key", "a{{.}}b"], "Go template"),
        (["--service", "../x", "--port", "8011", "--key", KEY], "service name"),
        (["--service", "alpha", "--port", "70000", "--key", KEY], "port"),
        (["--service", "alpha", "--key", KEY], "--port"),
        (["--service", "alpha", "--port", "8011", "--key", KEY, "--allow-path", "slots"], "must start with '/'"),
        (["--service", "alpha", "--port", "8011", "--key", KEY, "--allow-path", "/a'b"], "invalid path"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    result = routheon(tmp_path, "mapping", "add", *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.yml")) and not list(tmp_path.glob(".*.tmp"))


def test_allow_path_opens_more_for_a_files_keys_and_survives_every_rewrite(tmp_path: Path) -> None:
    second = "sk-second-0123456789abcdef"
    args = ["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--key", second]
    opened = routheon(tmp_path, *args, "--allow-path", "/slots", "--allow-path", "/metrics")
    assert opened.returncode == 0, opened.stderr
    assert "allowPaths: '/slots /metrics'" in (tmp_path / "alpha.yml").read_text()
    again = routheon(tmp_path, *args)  # without --allow-path the file keeps what it opens
    assert again.returncode == 0 and "unchanged" in again.stderr
    moved = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", second, "--replace")
    assert moved.returncode == 0, moved.stderr
    models = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--model", "alpha-model")
    assert models.returncode == 0, models.stderr
    opens = {mapping.path.name: mapping.allowed_paths for mapping in read_folder(tmp_path).files}
    assert opens == {"alpha.yml": ("/slots", "/metrics"), "beta.yml": (), "routheon-grants.yml": ()}
    args = ["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--allow-path", "none"]
    refused = routheon(tmp_path, *args)
    assert refused.returncode == 1 and "exists with other content" in refused.stderr  # access changes: --replace
    closed = routheon(tmp_path, *args, "--replace")
    assert closed.returncode == 0, closed.stderr
    assert (tmp_path / "alpha.yml").read_text() == render_mapping(MappingSpec("alpha", ("http://127.0.0.1:8011",), (KEY,)))


def test_key_routers_without_the_guard_are_named_and_upgrade_gives_them_one(tmp_path: Path) -> None:
    """1.0.x files and those of the Routheon before the guard reach every path with bodies of any size."""
    spec = MappingSpec("alpha", ("http://127.0.0.1:8011",), (KEY,))
    (tmp_path / "alpha.yml").write_text(with_earlier_body_reader(render_mapping(spec), "alpha"))
    (tmp_path / "llama-server-1.yml").write_text(SEED_MAPPING)
    unguarded = [line for line in findings(tmp_path) if "reach every path of the backend" in line]
    assert sorted({line.split(":")[0] for line in unguarded}) == [str(tmp_path / "alpha.yml"), str(tmp_path / "llama-server-1.yml")]
    assert f"{MAX_REQUEST_BODY_BYTES >> 20} MiB" in unguarded[0] and "run `routheon mapping upgrade`" in unguarded[0]
    grants = Grants(services=(GrantedService("alpha", ("alpha-model",)),)).grant("sk-granted-0123456789abcdef", ("alpha",))
    current = render_grants(grants)
    setting = f"          maxRequestBodyBytes: {MAX_REQUEST_BODY_BYTES}\n"
    earlier = with_earlier_body_reader(current.replace(setting, "", 1), "routheon-hop")
    (tmp_path / "routheon-grants.yml").write_text(earlier)
    upgraded = routheon(tmp_path, "mapping", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "alpha.yml").read_text() == render_mapping(spec)
    assert (tmp_path / "routheon-grants.yml").read_text() == current
    assert f"upgraded {tmp_path / 'routheon-grants.yml'}" in upgraded.stderr
    assert not [line for line in findings(tmp_path) if "reach every path of the backend" in line]


def test_one_request_body_limit_for_every_key_and_the_plugin_agrees() -> None:
    """Written into key files, the plugin's grants table and the hop; the plugin's default when unset is the same."""
    source = (REPO / "traefik" / "plugins-local" / "src" / "routheon" / "modelrouter" / "modelrouter.go").read_text()
    (default,) = [line.split("=")[1].strip() for line in source.splitlines() if line.startswith("const DefaultMaxRequestBodyBytes")]
    shift, _, power = default.partition(" << ")
    assert int(shift) << int(power) == MAX_REQUEST_BODY_BYTES == 64 * 1024 * 1024
    setting = f"maxRequestBodyBytes: {MAX_REQUEST_BODY_BYTES}"
    assert render_mapping(MappingSpec("alpha", ("http://127.0.0.1:8011",), (KEY,))).count(setting) == 1
    grants = Grants(services=(GrantedService("alpha", ("alpha-model",)),)).grant(KEY, ("alpha",))
    assert render_grants(grants).count(setting) == 2  # the plugin at the entry point and the hop's guard


def test_concurrent_adds_keep_every_mapping(tmp_path: Path) -> None:
    def add(index: int) -> int:
        key = f"sk-concurrent-{index:02d}-0123456789"
        args = ["mapping", "add", "--service", f"s{index}", "--port", str(9000 + index), "--key", key]
        return routheon_process(tmp_path, *args).returncode

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(add, range(8))) == [0] * 8
    found = keys_by_file(tmp_path)
    assert found == {f"s{index}.yml": [f"sk-concurrent-{index:02d}-0123456789"] for index in range(8)}


def test_concurrent_moves_of_one_key_leave_it_in_exactly_one_file(tmp_path: Path) -> None:
    def add(index: int) -> int:
        args = ["mapping", "add", "--service", f"s{index}", "--port", str(9000 + index), "--key", KEY, "--replace"]
        return routheon_process(tmp_path, *args).returncode

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(add, range(8))) == [0] * 8
    owners = [name for name, keys in keys_by_file(tmp_path).items() if KEY in keys]
    assert len(owners) == 1
    assert not has_errors(check_folder(tmp_path))


def test_script_and_command_write_identical_files(tmp_path: Path) -> None:
    by_script, by_command = tmp_path / "script", tmp_path / "command"
    by_script.mkdir()
    by_command.mkdir()
    key = r"k.y+2$\{x}|;&!#:*"
    env = {**os.environ, "ROUTHEON_BIN": ROUTHEON}
    script = subprocess.run(
        [str(SCRIPT), "--port", "8011", "--service", "TinyLlama_Chat", "--api_key", key, "--mappings", str(by_script)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert script.returncode == 0, script.stderr
    command = routheon(by_command, "mapping", "add", "--service", "TinyLlama_Chat", "--port", "8011", "--key", key)
    assert command.returncode == 0, command.stderr
    assert (by_script / "TinyLlama_Chat.yml").read_bytes() == (by_command / "TinyLlama_Chat.yml").read_bytes()


def test_script_runs_no_key_as_shell_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    key = f"$(touch${{IFS}}{marker})`touch${{IFS}}{marker}`;touch${{IFS}}{marker}"
    env = {**os.environ, "ROUTHEON_BIN": ROUTHEON}
    for candidate in (key, key.replace("`", "")):
        subprocess.run(
            [str(SCRIPT), "--port=8011", "--service=s", f"--api_key={candidate}", f"--mappings={tmp_path}"],
            capture_output=True, text=True, env=env, timeout=60,
        )
    assert not marker.exists()
    assert keys_by_file(tmp_path) == {"s.yml": [key.replace("`", "")]}


def test_script_rotates_like_the_seed_and_explains_errors(tmp_path: Path) -> None:
    env = {**os.environ, "ROUTHEON_BIN": ROUTHEON}
    run = lambda *args: subprocess.run(  # noqa: E731 - a local shorthand
        [str(SCRIPT), *args, "--mappings", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert run("--port", "8011", "--service", "one", "--api_key", KEY).returncode == 0
    assert run("--port", "8012", "--service", "two", "--api_key", "sk-two-0123456789abcdef").returncode == 0
    assert run("--port", "8013", "--service", "three", "--api_key", KEY).returncode == 0
    assert keys_by_file(tmp_path) == {"two.yml": ["sk-two-0123456789abcdef"], "three.yml": [KEY]}
    assert list(tmp_path.glob("one.yml.bak.*"))
    missing = run("--port", "8011", "--service", "x")
    assert missing.returncode == 2 and "--api_key is required" in missing.stderr
    no_cli = subprocess.run(
        [str(SCRIPT), "--port", "1", "--service", "x", "--api_key", KEY],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60,
    )
    assert no_cli.returncode == 2 and "routheon command was not found" in no_cli.stderr
    assert "--api_key" in run("--help").stdout


def findings(folder: Path) -> list[str]:
    return [str(finding) for finding in check_folder(folder)]


def test_check_names_the_broken_file_and_line(tmp_path: Path) -> None:
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    (tmp_path / "hand.yml").write_text(
        'http:\n  routers:\n    hand:\n      rule: "Header(`Authorization`, `Bearer a\\q`)"\n'
    )
    (tmp_path / "half.yml").write_text("http:\n  routers:\n    half:\n      rule: 'PathPrefix(`/`)'\n")
    result = routheon(tmp_path, "mapping", "check", "--no-connect")
    assert result.returncode == 1
    assert f"{tmp_path / 'hand.yml'}:4: error: not valid YAML" in result.stdout
    assert f"{tmp_path / 'half.yml'}:3: error: router 'half' needs a rule and a service" in result.stdout


def test_check_reports_what_traefik_would_reject_or_misroute(tmp_path: Path) -> None:
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--error-pages")
    (tmp_path / "seed.yml").write_text(SEED_MAPPING)
    (tmp_path / "seed.yml").chmod(0o644)
    (tmp_path / "pattern.yml").write_text(
        SEED_MAPPING.replace("llama-server-1", "pattern").replace("API_KEY-1", "k.y+2$")
    )
    (tmp_path / "dup.yml").write_text(
        SEED_MAPPING.replace("llama-server-1", "dup").replace("HeaderRegexp", "Header")
        .replace("`^Bearer (API_KEY-1)$`", f"`Bearer {KEY}`")
    )
    (tmp_path / "template.yml").write_text("# {{ .Env }}\nhttp: {}\n")
    edited = render_mapping(MappingSpec("edited", ("http://127.0.0.1:8013",), ("sk-old-0123456789abcdef",)))
    (tmp_path / "edited.yml").write_text(edited.replace("sk-old-", "sk-new-"))
    (tmp_path / "twice.yml").write_text("http:\n  routers: {}\n  routers: {}\n")
    text = "\n".join(findings(tmp_path))
    assert (
        "alpha.yml:5: warning: router 'alpha': no file defines routheon-errors (routheon-server.yml is not in the"
        " folder), so its keys route through 'alpha-without-error-pages', without OpenAI error pages"
    ) in text
    assert "seed.yml:3: warning: router 'llama-server-1': HeaderRegexp rule in the format of routheon-server 1.0.x" in text
    assert "pattern.yml:3: error: router 'pattern': HeaderRegexp rule reads the key as a regular expression" in text
    assert "dup.yml:3: error: router 'dup': an API key here is also routed by 'alpha' in alpha.yml" in text
    assert "template.yml:1: warning: '{{' starts a Go template" in text
    assert "twice.yml:3: error: http.routers is defined twice" in text
    assert "seed.yml: warning: holds API keys but every user can read it" in text
    assert "seed.yml:3: warning: router 'llama-server-1' passes request bodies on as they arrive" in text
    assert "alpha.yml:5: warning: router 'alpha' passes request bodies" not in text
    assert "seed.yml:3: warning: router 'llama-server-1' lets a second Authorization header ride along" in text
    assert "dup.yml:3: warning: router 'dup' lets a second Authorization header ride along" in text
    assert "alpha.yml:5: warning: router 'alpha' lets a second" not in text
    assert "edited.yml:5: error: router 'edited': a key's guard (!HeaderRegexp) was written for another key" in text
    assert "router 'edited' lets a second" not in text
    assert KEY not in text


def test_check_warns_about_unreachable_backends_but_passes(tmp_path: Path) -> None:
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--url", "http://127.0.0.1:9", "--key", KEY)
    result = routheon(tmp_path, "mapping", "check", "--timeout", "1")
    assert result.returncode == 0
    assert "warning: service 'alpha': backend http://127.0.0.1:9 does not answer" in result.stdout


def test_shipped_mappings_pass_the_check(tmp_path: Path) -> None:
    shipped = (REPO / "traefik" / "mappings" / "routheon-server.yml").read_text()
    (tmp_path / "routheon-server.yml").write_text(shipped)
    assert routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY).returncode == 0
    assert "routheon-errors" in (tmp_path / "alpha.yml").read_text()
    assert findings(tmp_path) == []
    listing = routheon(tmp_path, "mapping", "list").stdout.splitlines()
    assert [line.split()[:2] for line in listing[1:]] == [["alpha", "sk-t...cdef"], ["routheon-server", "-"]]


def test_the_error_pages_file_cannot_be_removed_while_keys_use_it(tmp_path: Path) -> None:
    shipped = (REPO / "traefik" / "mappings" / "routheon-server.yml").read_text()
    (tmp_path / "routheon-server.yml").write_text(shipped)
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    refused = routheon(tmp_path, "mapping", "remove", "--service", "routheon-server")
    assert refused.returncode == 1 and "alpha.yml" in refused.stderr
    assert (tmp_path / "routheon-server.yml").exists()


def test_keys_written_before_the_error_pages_say_so(tmp_path: Path) -> None:
    result = routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    assert result.returncode == 0 and "route without OpenAI error pages until routheon-server.yml" in result.stderr
    assert "without OpenAI error pages" in "\n".join(findings(tmp_path))
    bare = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key", "sk-b-0123456789abcdef", "--no-error-pages")
    assert bare.returncode == 0
    assert "beta.yml:5: warning: router 'beta' does not use routheon-errors" in "\n".join(findings(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root")
def test_files_take_the_folder_group_so_traefik_can_read_them(tmp_path: Path) -> None:
    group = 4242
    os.chown(tmp_path, -1, group)
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8012", "--key", KEY, "--replace")
    for path in [tmp_path / "alpha.yml", *tmp_path.glob("alpha.yml.bak.*")]:
        assert (path.stat().st_gid, mode(path)) == (group, 0o640), path


def test_a_missing_folder_is_named_when_reading(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    for args in (["mapping", "list"], ["mapping", "check"], ["mapping", "remove", "--service", "a"]):
        result = routheon(absent, *args)
        assert result.returncode == 1 and "does not exist" in result.stdout + result.stderr, args
    assert not absent.exists()


def test_add_creates_a_missing_folder_like_the_seed_script(tmp_path: Path) -> None:
    absent = tmp_path / "etc" / "mappings"
    result = routheon(absent, "mapping", "add", "--service", "a", "--port", "8011", "--key", KEY)
    assert result.returncode == 0, result.stderr
    assert mode(absent) == 0o750
    assert read_folder(absent).backend_urls() == ["http://127.0.0.1:8011"]


def test_check_finds_names_defined_twice_and_dangling_services(tmp_path: Path) -> None:
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    (tmp_path / "copy.yaml").write_text((tmp_path / "alpha.yml").read_text().replace(KEY, "sk-copy-0123456789abcdef"))
    (tmp_path / "dangling.yml").write_text(
        "http:\n  routers:\n    dangling:\n      rule: 'Header(`Authorization`, `Bearer sk-dangling-0123456789`)'\n"
        "      service: nowhere\n"
    )
    text = "\n".join(findings(tmp_path))
    assert "copy.yaml:5: error: router 'alpha' is also defined in alpha.yml" in text
    assert "copy.yaml:25: error: middleware 'alpha-request-body' is also defined in alpha.yml" in text
    assert "copy.yaml:31: error: service 'alpha' is also defined in alpha.yml" in text
    assert "dangling.yml:3: error: router 'dangling': service 'nowhere' is not defined" in text


def test_a_mapping_cannot_replace_the_error_pages_file(tmp_path: Path) -> None:
    shipped = (REPO / "traefik" / "mappings" / "routheon-server.yml").read_text()
    (tmp_path / "routheon-server.yml").write_text(shipped)
    routheon(tmp_path, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    args = ["mapping", "add", "--service", "routheon-server", "--port", "9080", "--key", "sk-x-0123456789abcdef"]
    refused = routheon(tmp_path, *args, "--replace")
    assert refused.returncode == 1 and "alpha.yml" in refused.stderr
    assert (tmp_path / "routheon-server.yml").read_text() == shipped


def test_remove_never_reaches_outside_the_folder(tmp_path: Path) -> None:
    folder, outside = tmp_path / "mappings", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "victim.yml").write_text("http: {}\n")
    result = routheon(folder, "mapping", "remove", "--service", "../outside/victim")
    assert result.returncode != 0 and "invalid service name" in result.stderr
    assert (outside / "victim.yml").exists()


def test_an_entry_point_cannot_inject_yaml(tmp_path: Path) -> None:
    hostile = "web\n        - websecure\n      priority: 2147483647"
    result = routheon(tmp_path, "mapping", "add", "--service", "a", "--port", "8011", "--key", KEY, "--entry-point", hostile)
    assert result.returncode != 0 and "invalid entry point" in result.stderr
    assert not (tmp_path / "a.yml").exists()


def test_fifos_and_deep_nesting_are_findings_not_hangs_or_crashes(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yml")
    (tmp_path / "deep.yml").write_text("http: " + "[" * 5000 + "]" * 5000 + "\n")
    result = subprocess.run(
        [ROUTHEON, "mapping", "check", "--no-connect", "--mappings", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    assert "pipe.yml" in output and "not a regular file" in output
    assert "deep.yml" in output and "nested too deeply" in output
    assert [problem.path.name for problem in read_folder(tmp_path).errors] == ["deep.yml", "pipe.yml"]


def test_taking_a_key_out_never_strands_another_files_router(tmp_path: Path) -> None:
    other_key = "sk-other-0123456789abcdef"
    routheon(tmp_path, "mapping", "add", "--service", "shared", "--port", "8011", "--key", KEY)
    (tmp_path / "other.yml").write_text(
        "http:\n  routers:\n    b:\n"
        f"      rule: 'Header(`Authorization`, `Bearer {other_key}`)'\n"
        "      service: shared\n      entryPoints:\n        - llama-servers\n"
    )
    before = (tmp_path / "shared.yml").read_text()
    result = routheon(tmp_path, "mapping", "remove", "--key", KEY)
    assert result.returncode != 0 and "other.yml" in result.stderr
    assert (tmp_path / "shared.yml").read_text() == before
    assert not has_errors(check_folder(tmp_path))
