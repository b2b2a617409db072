"""The loopback form of the shipped traefik.yml: only addresses and the folder change."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from routheon import loopback

from routheon.loopback import (
    LOOPBACK,
    LoopbackTraefik,
    ephemeral_ports,
    free_port,
    install_server_mapping,
    shipped_static_config,
)
from routheon.mappings.folder import read_folder
from routheon.mappings.format import ENTRY_POINT


def test_only_addresses_and_the_folder_change(tmp_path: Path) -> None:
    shipped = shipped_static_config()
    loopback = LoopbackTraefik(tmp_path / "mappings", {ENTRY_POINT: 18080}).apply(shipped)
    assert loopback["entryPoints"][ENTRY_POINT]["address"] == "127.0.0.1:18080"
    assert loopback["providers"]["file"] == {"directory": str((tmp_path / "mappings").resolve()), "watch": True}
    for section in set(shipped) - {"entryPoints", "providers"}:
        assert loopback[section] == shipped[section], section
    assert {k: v for k, v in loopback["entryPoints"][ENTRY_POINT].items() if k != "address"} == {
        k: v for k, v in shipped["entryPoints"][ENTRY_POINT].items() if k != "address"
    }


def test_sections_it_does_not_know_are_copied_and_other_entry_points_stay_private(tmp_path: Path) -> None:
    """A local plugin and a second public entry point, as later versions of traefik.yml may add."""
    static = {
        **shipped_static_config(),
        "experimental": {"localPlugins": {"guard": {"moduleName": "github.com/example/guard"}}},
    }
    static["entryPoints"] = {**static["entryPoints"], "websecure": {"address": ":443", "http": {"tls": {}}}}
    target = LoopbackTraefik(tmp_path, {ENTRY_POINT: 18080}, log_level="INFO", throttle="200ms").write(
        tmp_path / "traefik.yml", static
    )
    written = yaml.safe_load(target.read_text())
    assert written["experimental"] == static["experimental"]
    assert written["entryPoints"]["websecure"] == {"address": "127.0.0.1:0", "http": {"tls": {}}}
    assert written["log"]["level"] == "INFO" and written["providers"]["providersThrottleDuration"] == "200ms"
    assert static["entryPoints"]["websecure"]["address"] == ":443", "the caller's dict is left alone"


def test_the_server_mapping_points_at_loopback(tmp_path: Path) -> None:
    install_server_mapping(tmp_path, 19080)
    assert read_folder(tmp_path).backend_urls() == ["http://127.0.0.1:19080"]


def test_free_ports_stay_out_of_the_range_outgoing_connections_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outgoing connection may take a port from bind(0) before the child binds it."""
    (tmp_path / "range").write_text("32768\t60999\n")  # Linux's default, whatever this host says
    monkeypatch.setattr(loopback, "_EPHEMERAL_RANGE", str(tmp_path / "range"))
    ephemeral = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert not ports & set(ephemeral) and len(ports) > 1
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        taken.listen()
        assert free_port(preferred=port) != port
        assert free_port(preferred=next(iter(ports))) == next(iter(ports))


@pytest.mark.parametrize("ports", ["10000 60999", "15000\t65535", "1024 65535"])
def test_free_ports_leave_the_range_on_either_side_or_come_from_the_kernel(
    ports: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range that starts below 20000 leaves no port below it; the ports above it (if any) stay."""
    (tmp_path / "range").write_text(f"{ports}\n")
    monkeypatch.setattr(loopback, "_EPHEMERAL_RANGE", str(tmp_path / "range"))
    ephemeral = ephemeral_ports()
    assert ephemeral == range(int(ports.split()[0]), int(ports.split()[1]) + 1)
    drawn = {free_port() for _ in range(20)}
    assert all(0 < port <= 65535 for port in drawn)
    if ephemeral.stop <= 65535:
        assert not drawn & set(ephemeral)
