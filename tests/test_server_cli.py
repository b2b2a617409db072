"""Start-up errors of routheon-server: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from server_helpers import serving
from support import CliResult, request, run_command

from routheon import __version__
from routheon.server import __main__ as server_command
from routheon.server.config import parse_args


def start(*args: str) -> CliResult:
    """``routheon-server ARGS`` in this process: each of these ends before it would serve."""
    return run_command(server_command.main, *args)


def assert_one_line_error(result: CliResult, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("routheon-server: error:")
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], ["--port", "70000"]),
        (["--port", "http"], ["--port"]),
        (["--log-level", "LOUD"], ["--log-level", "LOUD"]),
        (["--mapping-timeout", "-1"], ["--mapping-timeout"]),
        (["--mapping-timeout", "nan"], ["--mapping-timeout"]),
        (["--idle-timeout", "0"], ["--idle-timeout"]),
        (["--skip-mapping", "(unclosed"], ["--skip-mapping"]),
        (["--no-such-flag"], ["--no-such-flag"]),
    ],
)
def test_bad_flags(args: list[str], words: list[str]) -> None:
    assert_one_line_error(start(*args), *words)


STATS_CONFIGS = {
    "not-yaml.yml": ("enabled_sections: [cpu\n", "YAML"),
    "a-list.yml": ("- cpu\n- memory\n", "mapping"),
    "sections-not-list.yml": ("enabled_sections: cpu\n", "enabled_sections"),
    "fields-not-mapping.yml": ("enabled_fields: [cpu]\n", "enabled_fields"),
    "field-list-of-maps.yml": ("enabled_fields:\n  cpu: [{a: 1}]\n", "enabled_fields.cpu"),
    "typo.yml": ("enable_sections: [cpu]\n", "enable_sections"),
}


@pytest.mark.parametrize("name", sorted(STATS_CONFIGS))
def test_bad_stats_config(tmp_path: Path, name: str) -> None:
    text, word = STATS_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text)
    assert_one_line_error(start("--stats-config-file", str(path), "--port", "1"), name, word)


def test_missing_stats_config(tmp_path: Path) -> None:
    assert_one_line_error(start("--stats-config-file", str(tmp_path / "absent.yml")), "absent.yml", "not found")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_stats_config(tmp_path: Path) -> None:
    path = tmp_path / "secret.yml"
    path.write_text("enabled_sections: [cpu]\n")
    path.chmod(0)
    assert_one_line_error(start("--stats-config-file", str(path)), "secret.yml")


def test_stats_config_that_is_a_folder(tmp_path: Path) -> None:
    assert_one_line_error(start("--stats-config-file", str(tmp_path)), str(tmp_path))


def test_unknown_stats_section_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "stats.yml"
    path.write_text("enabled_sections: [cpu, gpu]\n")
    with serving(["--mappings", str(tmp_path), "--stats-config-file", str(path)]) as server:
        assert set(request(f"{server.base}/stats").json()) == {"timestamp", "cpu"}
        assert "gpu" in server.proc.log()


def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(start("--port", str(port), "--mappings", "/nonexistent"), str(port))


def test_version_and_help() -> None:
    version = start("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    usage = start("--help")
    assert usage.returncode == 0
    for flag, default in [
        ("--mappings", "/etc/traefik/mappings"),
        ("--host", "127.0.0.1"),
        ("--port", "9080"),
        ("--skip-mapping", "routheon-server.yml"),
        ("--mapping-timeout", "2"),
        ("--idle-timeout", "15"),
        ("--stats-config-file", ""),
        ("--log-level", "WARNING"),
    ]:
        assert flag in usage.stdout and default in usage.stdout


def test_the_mappings_folder_comes_from_the_environment_like_for_the_routheon_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTHEON_MAPPINGS", str(tmp_path))
    assert parse_args([]).mappings == tmp_path
    assert parse_args(["--mappings", "/elsewhere"]).mappings == Path("/elsewhere")


@pytest.mark.parametrize(("variable", "args"), [("", []), (None, ["--mappings", ""])], ids=["variable", "flag"])
def test_an_empty_mappings_folder_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, args: list[str]
) -> None:
    """Empty is an unset variable: it meant /etc/traefik/mappings (the variable) or the current folder (the flag)."""
    if variable is None:
        monkeypatch.delenv("ROUTHEON_MAPPINGS", raising=False)
    else:
        monkeypatch.setenv("ROUTHEON_MAPPINGS", variable)
    with socket.socket() as taken:  # had it started, it would have stopped here, not served
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = start(*args, "--port", str(taken.getsockname()[1]))
    assert_one_line_error(result, "argument --mappings: empty (an unset variable?")
