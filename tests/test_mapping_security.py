"""Security review findings: crashes mid-change, hostile input, links and modes in the mappings folder."""

from __future__ import annotations

import http.server
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from routheon.mappings.check import check_folder
from routheon.mappings.folder import read_folder
from routheon.mappings.format import MappingSpec
from routheon.mappings.store import add_mapping
from routheon.supervisor import eventually
from support import REPO, VENV_BIN, CliResult, run_routheon

MOVED = "sk-moved-0123456789abcdef"
ALONE = "sk-alone-0123456789abcdef"
STAYS = "sk-stays-0123456789abcdef"


class Crash(BaseException):
    """What ``kill -9`` does to a writer: it stops between two steps, and no handler runs."""


def key_owners(folder: Path) -> Counter[str]:
    """How many files route each key, as ``routheon mapping list`` would count them."""
    return Counter(key for mapping in read_folder(folder).files for key in mapping.keys())


def crash_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Let ``steps`` changes of the folder happen (a rename into place, an unlink), then crash.

    Every write of the store ends in ``os.replace`` (new files, rewrites and backups alike) and
    every removal in ``os.unlink``, so this stops the change between any two of its steps.
    """
    done = 0
    real_replace, real_unlink = os.replace, os.unlink

    def step() -> None:
        nonlocal done
        if done == steps:
            raise Crash
        done += 1

    def replace(*args: object, **kwargs: object) -> None:
        step()
        real_replace(*args, **kwargs)

    def unlink(*args: object, **kwargs: object) -> None:
        step()
        real_unlink(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)


def moving_folder(root: Path, with_target: bool) -> Path:
    """A folder where one add --replace must rewrite one file, retire another and write a third."""
    folder = root / "mappings"
    folder.mkdir(parents=True)
    add_mapping(folder, MappingSpec("one", ("http://127.0.0.1:8011",), (MOVED, STAYS)))
    add_mapping(folder, MappingSpec("two", ("http://127.0.0.1:8012",), (ALONE,)))
    if with_target:
        add_mapping(folder, MappingSpec("three", ("http://127.0.0.1:8099",), ("sk-old-0123456789abcdef",)))
    return folder


MOVE = MappingSpec("three", ("http://127.0.0.1:8013",), (MOVED, ALONE))


@pytest.mark.parametrize("with_target", [True, False], ids=["replacing", "new-file"])
def test_a_crash_at_any_step_of_a_move_never_leaves_a_key_in_two_routers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_target: bool
) -> None:
    pristine = moving_folder(tmp_path / "pristine", with_target)
    steps = 0
    while True:
        folder = tmp_path / f"crash-{steps}"
        shutil.copytree(pristine, folder)
        with monkeypatch.context() as patch:
            crash_after(patch, steps)
            try:
                add_mapping(folder, MOVE, replace=True)
                finished = True
            except Crash:
                finished = False
        owners = key_owners(folder)
        assert max(owners.values()) == 1, f"crash after {steps} step(s): {owners}"
        assert not [str(f) for f in check_folder(folder) if "also routed by" in f.message], steps
        # running the command again after the crash finishes the move
        add_mapping(folder, MOVE, replace=True)
        assert key_owners(folder) == {MOVED: 1, ALONE: 1, STAYS: 1}
        assert {m.path.name for m in read_folder(folder).files} == {"one.yml", "three.yml"}
        if finished:
            break
        steps += 1
    assert steps == (6 if with_target else 5)  # every backup, rewrite, retirement and new file was cut


# --- the routheon command, as an operator runs it -------------------------------------------------

ROUTHEON = str(VENV_BIN / "routheon")
KEY = "sk-test-0123456789abcdef"


def routheon(folder: Path, *args: str, stdin: str | bytes | None = None) -> CliResult:
    return run_routheon(*args, "--mappings", str(folder), stdin=stdin)


def one_error_line(result: CliResult | subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with one ``routheon: error:`` line holding every fragment, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("routheon: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_planted_lock_link_is_refused_not_followed(tmp_path: Path) -> None:
    folder, victim = tmp_path / "mappings", tmp_path / "elsewhere" / "created-by-root"
    folder.mkdir()
    victim.parent.mkdir()
    (folder / ".routheon.lock").symlink_to(victim)
    result = routheon(folder, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY)
    one_error_line(result, ".routheon.lock is a symbolic link")
    assert not victim.exists() and not (folder / "alpha.yml").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--replace"],
        ["mapping", "remove", "--service", "alpha"],
    ],
    ids=["replace", "remove"],
)
def test_a_linked_mapping_file_is_neither_backed_up_nor_replaced_nor_removed(tmp_path: Path, args: list[str]) -> None:
    folder, secret = tmp_path / "mappings", tmp_path / "secret"
    folder.mkdir()
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    (folder / "alpha.yml").symlink_to(secret)
    one_error_line(routheon(folder, *args), "alpha.yml is a symbolic link")
    assert (folder / "alpha.yml").is_symlink() and secret.read_text().startswith("root:")
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == ["alpha.yml"]


@pytest.mark.parametrize(("mode", "who"), [(0o777, "every user"), (0o1777, "every user"), (0o770, "its group")])
def test_check_warns_about_a_folder_others_can_write(tmp_path: Path, mode: int, who: str) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "routheon-server.yml").write_text((REPO / "traefik" / "mappings" / "routheon-server.yml").read_text())
    assert routheon(folder, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY).returncode == 0
    assert routheon(folder, "mapping", "check", "--no-connect").stdout == ""
    folder.chmod(mode)
    result = routheon(folder, "mapping", "check", "--no-connect")
    assert result.returncode == 0  # a warning: Traefik still routes as intended today
    assert result.stdout == (
        f"{folder}: warning: the folder is writable by {who} (mode {mode:04o}): whoever can add a file here"
        f" can route any API key to a backend of their own; chmod go-w {folder}\n"
    )


SCRIPT = REPO / "traefik" / "create-mapping" / "create-mapping.sh"


def script(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUTHEON_BIN": ROUTHEON}
    return subprocess.run(
        [str(SCRIPT), "--port", "8011", "--service", "alpha", *args, "--mappings", str(folder)],
        capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [("", "--api_key is empty"), (f"{KEY}\nsk-second-0123456789ab", "line break"), (f"{KEY}\r", "line break")],
    ids=["empty", "newline", "carriage-return"],
)
def test_the_script_refuses_an_empty_or_multi_line_key(tmp_path: Path, key: str, message: str) -> None:
    result = script(tmp_path, "--api_key", key)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and message in result.stderr
    assert not (tmp_path / "alpha.yml").exists()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ("no API key in", "keys.txt")),
        (b"\n \n\r\n", ("no API key in", "keys.txt")),
        (KEY.encode() + b"\x0csk-second-0123456789ab\n", ("whitespace at position 25",)),
        (KEY.encode() + b"\x1csk-second-0123456789ab\n", ("whitespace at position 25",)),
        (KEY.encode() + b"\xff\n", ("keys.txt", "not UTF-8 text (byte 25)")),
    ],
    ids=["empty", "blank-lines", "form-feed", "file-separator", "not-utf8"],
)
def test_a_key_file_is_split_on_newlines_only_and_must_hold_a_key(
    tmp_path: Path, content: bytes, fragments: tuple[str, ...]
) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_bytes(content)
    folder = tmp_path / "mappings"
    result = routheon(folder, "mapping", "add", "--service", "alpha", "--port", "8011", "--key-file", str(key_file))
    line = one_error_line(result, *fragments)
    assert "sk-second" not in line and KEY not in line
    assert not (folder / "alpha.yml").exists()


def test_key_files_with_crlf_and_stdin_still_work(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_bytes(f"{KEY}\r\n\r\nsk-second-0123456789ab\r\n".encode())
    args = ["mapping", "add", "--service", "alpha", "--port", "8011"]
    assert routheon(tmp_path, *args, "--key-file", str(key_file)).returncode == 0
    assert key_owners(tmp_path) == {KEY: 1, "sk-second-0123456789ab": 1}
    refused = routheon(tmp_path, "mapping", "add", "--service", "beta", "--port", "8012", "--key-file", "-", stdin=b"\xfe")
    one_error_line(refused, "cannot read keys from stdin: not UTF-8 text (byte 1)")


@pytest.mark.parametrize("key_file", ["/dev/zero", "-"])
def test_an_endless_key_file_is_refused_not_read_until_memory_runs_out(tmp_path: Path, key_file: str) -> None:
    """`--key-file /dev/zero` (or stdin from it) read until MemoryError; the address space is capped
    here so that such a reader fails in seconds instead of taking the host's memory."""
    with open("/dev/zero", "rb") as zeros:
        result = subprocess.run(
            [ROUTHEON, "mapping", "add", "--service", "alpha", "--port", "8011", "--key-file", key_file,
             "--mappings", str(tmp_path)],
            capture_output=True, text=True, stdin=zeros, timeout=60,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)),
        )
    one_error_line(result, "cannot read keys from", "more than 16 MiB, not a file of keys")
    assert list(tmp_path.iterdir()) == []


def test_two_adds_creating_the_folder_at_once_both_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from routheon import cli

    folder = tmp_path / "etc" / "mappings"
    real_mkdir = Path.mkdir

    def other_add_wins_the_race(self: Path, *args: object, **kwargs: object) -> None:
        if self == folder:
            real_mkdir(self, 0o750, parents=True, exist_ok=True)  # the other `mapping add`, a moment earlier
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_add_wins_the_race)
    args = ["mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--mappings", str(folder)]
    assert cli.main(args) == 0
    assert key_owners(folder) == {KEY: 1}


def test_an_empty_mappings_flag_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [ROUTHEON, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--mappings", ""],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    one_error_line(result, "--mappings is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("host", "what"),
    [
        ("http://127.0.0.1/v1", "a path"),
        ("http://127.0.0.1:9000", "a port"),
        ("http://[::1]:9000", "a port"),
        ("http://127.0.0.1?x=1", "a query"),
        ("http://user:hunter2@127.0.0.1", "credentials"),
        ("http://h:1\\@evil", "credentials"),
        ("127.0.0.1", "a scheme and a host"),
    ],
)
def test_host_is_a_scheme_and_a_host_only(tmp_path: Path, host: str, what: str) -> None:
    result = routheon(tmp_path, "mapping", "add", "--service", "a", "--port", "8011", "--host", host, "--key", KEY)
    line = one_error_line(result, "--host must be a scheme and a host", what)
    assert "hunter2" not in line
    assert not (tmp_path / "a.yml").exists()


def test_host_without_extras_still_works(tmp_path: Path) -> None:
    for service, host in (("a", "https://backend.example/"), ("b", "http://[::1]")):
        result = routheon(tmp_path, "mapping", "add", "--service", service, "--port", "8011", "--host", host, "--key", service * 16)
        assert result.returncode == 0, result.stderr
    assert read_folder(tmp_path).backend_urls() == ["https://backend.example:8011", "http://[::1]:8011"]


@pytest.mark.parametrize("url", ["http://user:hunter2@127.0.0.1:8011", "http://h:1\\@evil", "http://hunter2@h:1"])
def test_backend_urls_with_credentials_are_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    result = routheon(tmp_path, "mapping", "add", "--service", "a", "--url", url, "--key", KEY)
    line = one_error_line(result, "credentials")
    assert "hunter2" not in line and "@" in line  # shown masked: http://***@...
    assert not (tmp_path / "a.yml").exists()


def test_list_and_check_mask_credentials_in_hand_written_files(tmp_path: Path) -> None:
    assert routheon(tmp_path, "mapping", "add", "--service", "a", "--url", "http://127.0.0.1:9", "--key", KEY).returncode == 0
    text = (tmp_path / "a.yml").read_text().replace("http://127.0.0.1:9", "http://user:hunter2@127.0.0.1:9")
    (tmp_path / "a.yml").write_text(text)
    listing = routheon(tmp_path, "mapping", "list")
    assert listing.returncode == 0 and "http://***@127.0.0.1:9" in listing.stdout
    check = routheon(tmp_path, "mapping", "check", "--timeout", "1")
    assert "backend http://***@127.0.0.1:9 does not answer" in check.stdout
    assert "hunter2" not in listing.stdout + listing.stderr + check.stdout + check.stderr


def test_check_survives_a_url_python_cannot_request(tmp_path: Path) -> None:
    (tmp_path / "odd.yml").write_text(
        "http:\n  services:\n    odd:\n      loadBalancer:\n        servers:\n          - url: 'http://h:x'\n"
    )
    result = routheon(tmp_path, "mapping", "check", "--timeout", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "backend http://h:x does not answer: nonnumeric port" in result.stdout


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1", "0", "1e300"])
def test_check_refuses_a_timeout_it_cannot_use(tmp_path: Path, timeout: str) -> None:
    assert routheon(tmp_path, "mapping", "add", "--service", "a", "--url", "http://127.0.0.1:9", "--key", KEY).returncode == 0
    result = routheon(tmp_path, "mapping", "check", "--timeout", timeout)
    one_error_line(result, "--timeout", "more than 0 and at most 3600 seconds")


def test_every_yaml_problem_is_one_finding_line_with_its_line_number(tmp_path: Path) -> None:
    (tmp_path / "nul.yml").write_text("http:\n  routers:\n    a: \x00\n")
    (tmp_path / "bell.yml").write_text("http: \x07\n")
    (tmp_path / "tab.yml").write_text("http:\n\t- b\n")
    result = routheon(tmp_path, "mapping", "check", "--no-connect", "--traefik", "none")
    assert result.returncode == 1
    assert sorted(result.stdout.splitlines()) == [
        f"{tmp_path / 'bell.yml'}:1: error: not valid YAML: character #x0007 is not allowed",
        f"{tmp_path / 'nul.yml'}:3: error: not valid YAML: character #x0000 is not allowed",
        f"{tmp_path / 'tab.yml'}:2: error: not valid YAML: found character '\\t' that cannot start any token",
    ]


class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    """A backend that answers every GET with the names of the request headers it received."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = json.dumps(list(self.headers.keys())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.traefik
def test_traefik_starts_without_the_alias_warning_and_drops_aliased_headers(tmp_path: Path) -> None:
    from traefik_stack import Stack

    echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with Stack(tmp_path) as stack:
            url = f"http://127.0.0.1:{echo.server_address[1]}"
            stack.routheon("mapping", "add", "--service", "echo", "--url", url, "--key", KEY)
            stack.wait_for(lambda: stack.request("/", key=KEY).status == 200)
            reply = stack.request("/", key=KEY, headers={"X_Real_Ip": "10.0.0.1", "X.Forwarded.For": "10.0.0.2"})
            assert reply.status == 200
            received = {name.lower() for name in reply.json()}
            assert "x-real-ip" in received and not received & {"x_real_ip", "x.forwarded.for"}
            assert stack.traefik is not None
            log = stack.traefik.log()
        assert "aliasHeadersStrategy" not in log
    finally:
        echo.shutdown()


# --- the private copies a write has Traefik judge ---------------------------------------------------


def judging_forever(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`mapping add` of KEY in a process of its own, held while "Traefik" (a sleep) judges the change.

    Its temporary folder is ``tmp_path/tmp``; returned once the copy with the new key is there.
    """
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    traefik = tmp_path / "traefik"
    traefik.write_text("#!/bin/sh\nexec sleep 120\n")
    traefik.chmod(0o755)
    process = subprocess.Popen(
        [ROUTHEON, "mapping", "add", "--service", "alpha", "--port", "8011", "--key", KEY, "--traefik", str(traefik),
         "--traefik-timeout", "120", "--mappings", str(tmp_path / "mappings")],
        env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert eventually(lambda: any(KEY in path.read_text() for path in tmp.glob("routheon-verdict-*/mappings/*.yml")))
    return process, tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_write_stopped_by_a_signal_leaves_no_copy_of_the_keys(tmp_path: Path, sig: signal.Signals) -> None:
    process, tmp = judging_forever(tmp_path)
    try:
        copies = [*tmp.iterdir(), *tmp.glob("*/mappings"), *tmp.glob("*/mappings/**/*")]
        assert len(copies) > 4
        for path in copies:  # while they are there, only their owner reads them
            if path.is_dir():
                assert path.stat().st_mode & 0o777 == 0o700, path
            elif path.suffix == ".yml":
                assert path.stat().st_mode & 0o777 == 0o600, path
        process.send_signal(sig)
        assert process.wait(timeout=30) == 128 + sig
    finally:
        process.kill()
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "mappings" / "alpha.yml").exists()


def test_the_copies_of_a_killed_write_go_with_the_next_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process, tmp = judging_forever(tmp_path)
    process.kill()  # kill -9: no handler runs
    process.wait(timeout=30)
    left = sorted(path.name for path in tmp.iterdir())
    assert [name.split("-")[:3] for name in left] == [
        ["routheon", "change", str(process.pid)], ["routheon", "verdict", str(process.pid)]
    ]
    ours = tmp / f"routheon-verdict-{os.getpid()}-x"  # a live process's copy stays
    ours.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    (tmp_path / "other").mkdir()
    assert routheon(tmp_path / "other", "mapping", "check", "--no-connect").returncode == 0
    assert list(tmp.iterdir()) == [ours]
