"""Reading mapping folders: files in the format of routheon-server 1.0.x, broken files and the files Traefik ignores."""

from pathlib import Path

from routheon.mappings.folder import is_mapping_name, read_folder
from samples import SEED_MAPPING


def test_seed_mapping_gives_its_backend(tmp_path: Path) -> None:
    (tmp_path / "llama-server-1.yml").write_text(SEED_MAPPING)
    folder = read_folder(tmp_path)
    assert folder.errors == ()
    assert folder.backend_urls() == ["http://127.0.0.1:8011"]
    (router,) = folder.files[0].routers
    assert router.service == "llama-server-1" and router.entry_points == ("llama-servers",)


def test_broken_and_ignored_files(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(SEED_MAPPING)
    (tmp_path / "broken.yml").write_text("http:\n  routers: [\n")
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    (tmp_path / "old.yml.bak.20250101-000000").write_text("not: [yaml")
    (tmp_path / "routheon-server.yml").write_text(SEED_MAPPING.replace("8011", "9080"))
    folder = read_folder(tmp_path)
    assert folder.backend_urls() == ["http://127.0.0.1:8011", "http://127.0.0.1:9080"]
    problems = {p.path.name: p for p in folder.errors}
    assert set(problems) == {"broken.yml", "list.yml"}
    assert problems["broken.yml"].line is not None
    assert "YAML" in problems["broken.yml"].message


def test_missing_folder_is_reported_not_raised(tmp_path: Path) -> None:
    folder = read_folder(tmp_path / "absent")
    assert not folder.exists and folder.files == ()


def test_mapping_names() -> None:
    assert is_mapping_name("a.yml") and is_mapping_name("a.yaml")
    assert not is_mapping_name("a.yml.bak.1") and not is_mapping_name(".a.yml.tmp")
