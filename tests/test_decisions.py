"""An operator's decisions from a terminal (`post`, `forget`, `ignore`) reach the journal under
the units' identifier and name the person; a mistyped name is said as such."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli

from smt_droplet import spool

ESIID = "10443720000000099"


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for journald's ``/dev/log``."""
    path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except TimeoutError:
            return lines


@pytest.fixture
def env(webapp, inbox: Path, tmp_path: Path, journal) -> dict[str, str]:
    spool.ensure_layout(tmp_path / "spool")
    assert webapp.admin_token is not None
    return {
        "ADMIN_TOKEN": webapp.admin_token,
        "INTELLIWATT_BASE_URL": webapp.url,
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SPOOL_DIR": str(tmp_path / "spool"),
        "SMT_SYSLOG_SOCKET": str(journal[0]),
        "SMT_OPERATOR": "alice",
    }


def test_post_forget_and_ignore_go_to_the_journal_naming_the_person(
    env, inbox: Path, journal, smt_csv, webapp
) -> None:
    _, sock = journal
    orphan = inbox / "orphan.csv"
    orphan.write_bytes(smt_csv(esiid=ESIID).replace(f"'{ESIID}".encode(), b"''"))
    assert cli(["ingest", "--no-sync"], env).returncode == 0
    received(sock)  # a pass run from a terminal is not a decision: nothing expected either way
    done = cli(["post", "orphan.csv", "--esiid", ESIID], env)
    assert done.returncode == 0, done.stderr
    lines = received(sock)
    assert any(
        line.startswith("<") and "smt-ingest: INFO posted orphan.csv" in line for line in lines
    )
    assert any("post orphan.csv by alice" in line for line in lines), lines
    # and in the pass record /health, status and upload-csv.yml read
    record = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert record is not None and record["trigger"] == "post"
    assert [(d["action"], d["path"], d["by"]) for d in record["decisions"]] == [
        ("post", "orphan.csv", "alice")
    ]
    forgot = cli(["forget", "orphan.csv"], env)
    assert forgot.returncode == 0, forgot.stderr
    said = "".join(received(sock))
    assert "forgot orphan.csv" in said and "by alice; the next pass posts it again" in said
    assert cli(["ignore", "orphan.csv", "--reason", "a test export"], env).returncode == 0
    assert "(by alice; undo with `smt-droplet forget" in "".join(received(sock))


def test_forgetting_a_file_without_esiid_says_it_still_needs_one(env, inbox: Path, journal) -> None:
    (inbox / "orphan.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    assert cli(["ingest", "--no-sync"], env).returncode == 0
    forgot = cli(["forget", "orphan.csv"], env)
    assert forgot.returncode == 0, forgot.stderr
    assert "it still needs an ESIID" in forgot.stderr
    assert "the next pass posts it again" not in forgot.stderr


def test_a_mistyped_name_is_not_a_configuration_error(env, inbox: Path) -> None:
    for command in (["post", "no-such.csv"], ["forget", "no-such.csv"]):
        proc = cli(command, env)
        assert proc.returncode == 2
        assert "configuration error" not in proc.stderr
        assert f"{command[0]}: no-such.csv: neither a file" in proc.stderr
        assert "`smt-droplet status` lists the files" in proc.stderr


def test_control_characters_in_a_name_are_escaped_in_the_journal_and_status(
    env, inbox: Path, journal
) -> None:
    _, sock = journal
    name = "red\x1b[31m\rforged.csv"
    (inbox / name).write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")  # no ESIID: a warning
    proc = cli(["ingest", "--no-sync"], env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert "red\\x1b[31m\\x0dforged.csv needs an operator" in proc.stderr
    shown = cli(["status"], env).stdout
    assert "\x1b" not in shown and "red\\x1b[31m\\x0dforged.csv" in shown
    assert cli(["forget", name], env).returncode == 0
    said = "".join(received(sock))
    assert "\x1b" not in said and "forgot red\\x1b[31m\\x0dforged.csv" in said


def test_page_decisions_are_in_the_record_of_the_pass_that_carried_them_out(
    env, inbox: Path, smt_csv
) -> None:
    """The page's decisions wait in the spool; the pass that applies them lists them, with
    the person the page's sign-in named."""
    orphan = inbox / "orphan.csv"
    orphan.write_bytes(smt_csv(esiid=ESIID).replace(f"'{ESIID}".encode(), b"''"))
    assert cli(["ingest", "--no-sync"], env).returncode == 0  # no-esiid: waits for a person
    record = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert record is not None and record["decisions"] == []
    digest = hashlib.sha256(orphan.read_bytes()).hexdigest()
    spool.enqueue(
        Path(env["SMT_SPOOL_DIR"]),
        "page",
        reason="a test export",
        extra={"action": "ignore", "sha256": digest, "by": "page (bob@example.test)"},
    )
    assert cli(["ingest", "--no-sync"], env).returncode == 0
    record = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert record is not None
    assert record["decisions"] == [
        {
            "action": "ignore",
            "path": "orphan.csv",
            "sha256": digest,
            "by": "page (bob@example.test)",
        }
    ]
