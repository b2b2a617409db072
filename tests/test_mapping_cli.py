"""The routheon command's options, run in-process: bounded backups, `mapping prune`,
$ROUTHEON_MAPPINGS, and -q after the command; create-mapping.sh's defaults and install hint."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from routheon import cli
from routheon.mappings.folder import read_folder
from support import REPO, VENV_BIN, run_routheon

SCRIPT = REPO / "traefik" / "create-mapping" / "create-mapping.sh"
KEY = "sk-test-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_settings_from_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTHEON_MAPPINGS", raising=False)
    monkeypatch.delenv("ROUTHEON_BACKUPS", raising=False)


def run(*args: str) -> tuple[int, str, str]:
    """``routheon ARGS`` in this process: exit status, stdout, stderr."""
    result = run_routheon(*args)
    return result.returncode, result.stdout, result.stderr


def add(folder: Path, port: int, *extra: str) -> str:
    code, _, err = run(
        "mapping", "add", "--service", "alpha", "--port", str(port), "--key", KEY, "--replace",
        "--mappings", str(folder), *extra,
    )
    assert code == 0, err
    return err


def backups(folder: Path, name: str = "alpha.yml") -> list[Path]:
    """Backups as Routheon names them, whatever else the folder holds."""
    return sorted(path for path in folder.glob(f"{name}.bak.*") if re.fullmatch(r"\d{8}-\d{6}(\.\d+)?", path.name[len(name) + 5:]))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- bounded backups ------------------------------------------------------------------------


def test_each_write_keeps_only_the_newest_backups(tmp_path: Path) -> None:
    for port in range(8011, 8021):  # nine replacements, most within one second
        add(tmp_path, port)
    kept = backups(tmp_path)
    assert len(kept) == 5
    # the newest five: the content before the last five replacements, not whatever sorted last
    assert sorted(int(path.read_text().split("127.0.0.1:")[1][:4]) for path in kept) == list(range(8015, 8020))
    assert all(mode(path) == 0o640 for path in kept)
    err = add(tmp_path, 8021)
    assert "deleted" in err and "alpha.yml.bak." in err


def test_the_number_kept_comes_from_the_flag_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for port in range(8011, 8016):
        add(tmp_path, port)
    assert len(backups(tmp_path)) == 4
    monkeypatch.setenv("ROUTHEON_BACKUPS", "2")
    add(tmp_path, 8016)
    assert len(backups(tmp_path)) == 2
    add(tmp_path, 8017, "--backups", "1")  # the flag wins over the variable
    assert len(backups(tmp_path)) == 1
    monkeypatch.setenv("ROUTHEON_BACKUPS", "many")
    code, _, err = run("mapping", "add", "--service", "alpha", "--port", "8018", "--key", KEY,
                       "--replace", "--mappings", str(tmp_path))
    assert code == 1 and "ROUTHEON_BACKUPS" in err
    assert "8017" in (tmp_path / "alpha.yml").read_text()
    code, _, err = run("mapping", "add", "--service", "alpha", "--port", "8018", "--key", KEY,
                       "--backups", "-1", "--mappings", str(tmp_path))
    assert code == 2 and "--backups" in err


def test_revoking_with_no_backups_leaves_no_copy_of_the_key(tmp_path: Path) -> None:
    run("mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--key", OTHER,
        "--mappings", str(tmp_path))
    add(tmp_path, 8012, "--key", OTHER)  # one backup holding both keys
    assert len(backups(tmp_path)) == 1
    code, _, err = run("mapping", "remove", "--key", OTHER, "--backups", "0", "--mappings", str(tmp_path))
    assert code == 0, err
    assert "no backup kept" in err
    assert backups(tmp_path) == []
    assert not any(OTHER in path.read_text() for path in tmp_path.iterdir() if path.is_file())


def test_a_backup_is_never_more_readable_than_its_file(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "alpha.yml").chmod(0o600)
    add(tmp_path, 8012)
    (backup,) = backups(tmp_path)
    assert mode(backup) == 0o600


def test_prune_deletes_only_old_routheon_backups_and_names_them(tmp_path: Path) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    stamps = [f"2025010{day}-120000" for day in range(1, 8)]
    ours = [folder / f"alpha.yml.bak.{stamp}" for stamp in stamps] + [folder / f"alpha.yml.bak.{stamps[-1]}.1"]
    ours += [folder / "hand.yaml.bak.20240101-000000", folder / "hand.yaml.bak.20240102-000000"]
    for path in ours:
        path.write_text(f"http: {{}}  # {KEY}\n")
        path.chmod(0o644)
    victim = tmp_path / "victim.yml"
    victim.write_text("outside\n")
    decoys = [
        folder / "alpha.yml",
        folder / "alpha.yml.bak",  # a sed -i.bak leftover
        folder / "alpha.yml.bak.2025",
        folder / "alpha.yml.bak.20250101-120000.x",
        folder / "notes.txt.bak.20200101-000000",
        folder / ".alpha.yml.bak.20200101-000000",
    ]
    for path in decoys:
        path.write_text("keep me\n")
    link = folder / "beta.yml.bak.20200101-000000"
    link.symlink_to(victim)
    (folder / "gamma.yml.bak.20200101-000000").mkdir()
    (folder / "sub").mkdir()
    nested = folder / "sub" / "alpha.yml.bak.20000101-000000"
    nested.write_text("keep me\n")

    code, _, err = run("mapping", "prune", "--keep", "2", "--mappings", str(folder))
    assert code == 0, err
    expected_gone = [folder / f"alpha.yml.bak.{stamp}" for stamp in stamps[:6]]
    assert all(not path.exists() for path in expected_gone)
    for path in expected_gone:
        assert f"deleted {path}" in err
    assert sorted(p.name for p in backups(folder)) == [f"alpha.yml.bak.{stamps[-1]}", f"alpha.yml.bak.{stamps[-1]}.1"]
    assert len(backups(folder, "hand.yaml")) == 2
    assert all(mode(path) == 0o640 for path in backups(folder) + backups(folder, "hand.yaml"))
    assert all(path.read_text() == "keep me\n" for path in [*decoys, nested])
    assert link.is_symlink() and victim.read_text() == "outside\n"
    assert (folder / "gamma.yml.bak.20200101-000000").is_dir()

    code, _, err = run("mapping", "prune", "--keep", "0", "--mappings", str(folder))
    assert code == 0 and backups(folder) == [] and backups(folder, "hand.yaml") == []
    assert err.count("deleted ") == 4
    assert all(path.exists() for path in [*decoys, nested]) and link.is_symlink()
    code, _, err = run("mapping", "prune", "--mappings", str(folder))
    assert code == 0 and "no backup to delete" in err


def test_prune_keeps_five_by_default_or_what_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for day in range(1, 10):
        (tmp_path / f"alpha.yml.bak.2025010{day}-000000").write_text("x\n")
    assert run("mapping", "prune", "--mappings", str(tmp_path))[0] == 0
    assert len(backups(tmp_path)) == 5
    monkeypatch.setenv("ROUTHEON_BACKUPS", "3")
    assert run("mapping", "prune", "--mappings", str(tmp_path))[0] == 0
    assert [p.name[-15:-7] for p in backups(tmp_path)] == ["20250107", "20250108", "20250109"]


# --- $ROUTHEON_MAPPINGS --------------------------------------------------------------------------


def test_the_environment_names_the_folder_unless_the_flag_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env, from_flag = tmp_path / "env", tmp_path / "flag"
    add(from_env, 8010)
    monkeypatch.setenv("ROUTHEON_MAPPINGS", str(from_env))
    code, out, _ = run("mapping", "list")  # read first: never write to the real default here
    assert code == 0 and "alpha" in out
    code, _, err = run("mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--replace")
    assert code == 0, err
    assert "8011" in (from_env / "alpha.yml").read_text()
    code, _, err = run("mapping", "check", "--no-connect")
    assert code == 0 and str(from_env) in err
    add(from_env, 8012)
    assert run("mapping", "prune", "--keep", "0")[0] == 0
    assert backups(from_env) == []
    assert run("mapping", "remove", "--key", KEY)[0] == 0
    assert not read_folder(from_env).files

    code, _, err = run("mapping", "add", "--service", "beta", "--port", "8013", "--key", OTHER,
                       "--mappings", str(from_flag))
    assert code == 0, err
    assert (from_flag / "beta.yml").is_file() and not (from_env / "beta.yml").exists()


@pytest.mark.parametrize(
    "command",
    [["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY], ["mapping", "list"], ["key", "list"]],
)
def test_an_empty_environment_variable_is_refused_like_an_empty_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """ROUTHEON_MAPPINGS= in a unit file fell back to the default folder, and `mapping add` created it."""
    default = tmp_path / "etc-traefik-mappings"
    default.mkdir()
    monkeypatch.setattr(cli, "DEFAULT_MAPPINGS", str(default))
    monkeypatch.setenv("ROUTHEON_MAPPINGS", "")
    code, out, err = run(*command)
    assert code == 1 and out == ""
    assert err == "routheon: error: $ROUTHEON_MAPPINGS is set but empty (an unset variable?): set it to the mappings folder, or unset it for " + str(default) + "\n"
    assert list(default.iterdir()) == []


def test_help_names_the_environment_variables() -> None:
    for command in (["mapping", "add"], ["mapping", "list"], ["mapping", "remove"], ["mapping", "check"],
                    ["mapping", "prune"]):
        code, out, _ = run(*command, "--help")
        assert code == 0 and "$ROUTHEON_MAPPINGS" in out and "/etc/traefik/mappings" in out, command
    for command in (["mapping", "add"], ["mapping", "remove"], ["mapping", "prune"]):
        assert "$ROUTHEON_BACKUPS" in run(*command, "--help")[1], command


# --- -q after the command -----------------------------------------------------------------------


def test_quiet_works_before_and_after_the_command(tmp_path: Path) -> None:
    base = ["--service", "alpha", "--port", "8011", "--key", KEY, "--key", OTHER, "--mappings", str(tmp_path)]
    code, _, err = run("mapping", "add", "-q", *base)
    assert (code, err) == (0, "")
    code, _, err = run("mapping", "remove", "-q", "--key", KEY, "--mappings", str(tmp_path))
    assert (code, err) == (0, "")
    code, _, err = run("-q", "mapping", "remove", "--key", OTHER, "--mappings", str(tmp_path))
    assert (code, err) == (0, "")
    code, _, err = run("mapping", "prune", "--quiet", "--keep", "0", "--mappings", str(tmp_path))
    assert (code, err) == (0, "")
    code, _, err = run("mapping", "add", *base)
    assert code == 0 and "wrote" in err


# --- create-mapping.sh ---------------------------------------------------------------------------


def script(*args: str, env: dict[str, str], path: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, env=env, timeout=60)


def test_script_writes_into_the_environments_folder_unless_told_otherwise(tmp_path: Path) -> None:
    from_env, from_flag = tmp_path / "env", tmp_path / "flag"
    env = {**os.environ, "ROUTHEON_BIN": str(VENV_BIN / "routheon"), "ROUTHEON_MAPPINGS": str(from_env)}
    result = script("--port", "8011", "--service", "alpha", "--api_key", KEY, env=env)
    assert result.returncode == 0, result.stderr
    assert (from_env / "alpha.yml").is_file()
    result = script("--port", "8011", "--service", "beta", "--api_key", OTHER, "--mappings", str(from_flag), env=env)
    assert result.returncode == 0, result.stderr
    assert (from_flag / "beta.yml").is_file() and not (from_env / "beta.yml").exists()
    assert "ROUTHEON_MAPPINGS" in script("--help", env=env).stdout


def test_script_refuses_an_empty_environment_variable(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ROUTHEON_MAPPINGS": "", "ROUTHEON_BIN": "/bin/echo"}
    result = script("--port", "8011", "--service", "alpha", "--api_key", KEY, env=env)
    assert result.returncode != 0 and "ROUTHEON_MAPPINGS set to nothing" in result.stderr
    assert result.stdout == ""  # routheon (here echo) was never called


def test_script_without_routheon_says_how_to_install_it(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = script("--port", "1", "--service", "x", "--api_key", KEY, env=env)
    assert result.returncode == 2
    # from a clone: the command to type, naming this clone (PyPI has no "routheon")
    assert "pip install routheon" not in result.stderr
    assert f"~/.routheon/venv/bin/pip install '{REPO}'" in result.stderr
    assert 'name = "routheon"' in (REPO / "pyproject.toml").read_text()
    # installed on its own (as in /usr/local/bin): it says where the package comes from
    copy = tmp_path / "create-mapping.sh"
    shutil.copy(SCRIPT, copy)
    result = script("--port", "1", "--service", "x", "--api_key", KEY, env=env, path=copy)
    assert result.returncode == 2
    assert "from a clone of its repository" in result.stderr
    assert "python3 -m venv ~/.routheon/venv && ~/.routheon/venv/bin/pip install" in result.stderr


# --- confirmed writes -----------------------------------------------------------------------
# Traefik 3.7.15 rejects the whole folder for a misspelt field; Routheon's own reader does not
# notice it, so these refusals come from Traefik's verdict.
MISSPELT = "http:\n  services:\n    other:\n      loadBalancer:\n        serverz:\n          - url: http://127.0.0.1:1\n"


def test_a_revocation_in_a_folder_traefik_rejects_fails_loudly_and_writes_nothing(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "other.yml").write_text(MISSPELT)
    before = (tmp_path / "alpha.yml").read_bytes()
    code, out, err = run("-q", "mapping", "remove", "--key", KEY, "--mappings", str(tmp_path))
    assert code == 1 and out == ""
    assert "nothing was written" in err and "other.yml" in err and "serverz" in err and "--force" in err
    assert (tmp_path / "alpha.yml").read_bytes() == before and not backups(tmp_path)


def test_force_writes_into_a_rejected_folder_but_still_fails(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "other.yml").write_text(MISSPELT)
    code, _, err = run("mapping", "remove", "--key", KEY, "--force", "-q", "--mappings", str(tmp_path))
    assert code == 1 and "none of it takes effect" in err
    assert not (tmp_path / "alpha.yml").exists() and len(backups(tmp_path)) == 1


def test_a_change_that_would_disable_its_own_routers_is_refused(tmp_path: Path) -> None:
    code, _, err = run(
        "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY,
        "--entry-point", "websecure", "--mappings", str(tmp_path),
    )
    assert code == 1 and "nothing was written" in err
    assert 'entryPoint "websecure" doesn\'t exist' in err and "--traefik-config" in err
    assert not (tmp_path / "alpha.yml").exists()
    config = tmp_path / "traefik.yml"
    config.write_text("entryPoints:\n  websecure:\n    address: ':8443'\n")
    code, _, err = run(
        "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--entry-point",
        "websecure", "--traefik-config", str(config), "--mappings", str(tmp_path / "m"),
    )
    assert code == 0, err


def test_removing_the_broken_file_is_allowed_and_heals_the_folder(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "other.yml").write_text(MISSPELT)
    code, _, err = run("mapping", "remove", "--service", "other", "--mappings", str(tmp_path))
    assert code == 0, err
    code, _, err = run("mapping", "check", "--no-connect", "--mappings", str(tmp_path))
    assert code == 0 and "applies this folder" in err


def test_without_traefik_the_reader_judges_and_says_so(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "broken.yml").write_text("http:\n  routers: [\n")
    code, _, err = run("mapping", "remove", "--key", KEY, "--traefik", "none", "--mappings", str(tmp_path))
    assert code == 1 and "nothing was written" in err and "broken.yml" in err
    assert (tmp_path / "alpha.yml").exists()


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "inf", "soon"])
def test_the_verdicts_timeout_is_refused_unless_it_is_a_wait(tmp_path: Path, timeout: str) -> None:
    """nan and -1 made the verdict fail at once, and the write went ahead judged by the reader alone."""
    code, _, err = run(
        "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY,
        f"--traefik-timeout={timeout}", "--mappings", str(tmp_path),
    )
    assert code == 2 and f"argument --traefik-timeout: '{timeout}'" in err
    assert not (tmp_path / "alpha.yml").exists()


@pytest.mark.parametrize("traefik", ["/bin/false", "/no/such/traefik"])
def test_a_write_traefik_could_not_judge_says_so_even_when_quiet(tmp_path: Path, traefik: str) -> None:
    code, _, err = run("-q", "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY,
                       "--traefik", traefik, "--mappings", str(tmp_path))
    assert code == 0 and (tmp_path / "alpha.yml").exists()
    assert err.count("Traefik's verdict is missing") == 1 and "only Routheon's reader judged this change" in err
    assert ("printing nothing" if traefik == "/bin/false" else "No such file") in err, err


def test_a_missing_traefik_binary_is_said_even_when_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(cli, "find_traefik", lambda explicit=None: None)  # none beside this Python either
    code, _, err = run("-q", "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY,
                       "--mappings", str(tmp_path))
    assert code == 0 and "warning: no traefik binary found" in err


@pytest.mark.parametrize("command", [["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY],
                                     ["mapping", "check", "--no-connect"], ["key", "list"]])
def test_a_traefik_config_that_is_not_there_is_an_error(tmp_path: Path, command: list[str]) -> None:
    """It was read as "no file": other entry points judged the folder, the grants kept another hop port."""
    code, _, err = run(*command, "--traefik-config", str(tmp_path / "traefik.yml"), "--mappings", str(tmp_path))
    assert code == 1 and f"--traefik-config {tmp_path / 'traefik.yml'}: no such file" in err
    assert not (tmp_path / "alpha.yml").exists()


def test_list_names_keys_traefik_routes_that_it_cannot_show(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "hand.yml").write_text(
        "http:\n  routers:\n    hand:\n"
        f"      rule: 'Header(`Authorization`, `Bearer {OTHER}`) || Header(`X-Team`, `a`)'\n"
        "      service: alpha\n      entryPoints: [llama-servers]\n"
    )
    code, out, err = run("-q", "mapping", "list", "--mappings", str(tmp_path))
    assert code == 1 and "alpha.yml" in out
    assert "hand.yml" in err and "cannot be listed or revoked" in err


def test_an_unchanged_mapping_in_a_rejected_folder_is_not_reported_as_fine(tmp_path: Path) -> None:
    add(tmp_path, 8011)
    (tmp_path / "other.yml").write_text(MISSPELT)
    code, _, err = run(
        "-q", "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--mappings", str(tmp_path)
    )
    assert code == 1 and "other.yml" in err


# --- main() as a library call ---------------------------------------------------------------------


def test_each_line_is_logged_once_however_often_main_runs(tmp_path: Path) -> None:
    for port in (8011, 8012, 8013):
        _, _, err = run("mapping", "add", "--service", "alpha", "--port", str(port), "--key", KEY,
                        "--replace", "--mappings", str(tmp_path))
        lines = err.splitlines()
        assert lines and len(lines) == len(set(lines)), err


def test_a_bug_keeps_its_traceback(tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Only Routheon's own refusals become one line: any other ValueError is a bug to see whole."""

    def broken(*_: object, **__: object) -> None:
        raise ValueError("a bug, not a refusal")

    monkeypatch.setattr(cli, "add_mapping", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--mappings", str(tmp_path)])
