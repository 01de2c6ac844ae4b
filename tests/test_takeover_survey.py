"""The seed survey behind ``playbooks/migrate.yml`` (``takeover.py``): a real listener on
loopback, a hand-written env file, unit files with and without Ansible's header. The whole
takeover runs in Molecule (molecule/takeover)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smt_droplet.envfile import EnvFileError, parse_env_text
from smt_droplet.takeover import differences, listeners, survey

TOKEN = "seed-admin-token-" + "x" * 47


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hand_started(tmp_path: Path):
    """A Python server started by hand on loopback, as the seed's nohup webhook was."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.05)
    yield port, proc.pid
    proc.terminate()
    proc.wait(timeout=10)


def test_a_listener_is_found_with_its_pid_and_command(hand_started) -> None:
    port, pid = hand_started
    found = listeners({port})
    assert [(lst.port, lst.pid) for lst in found] == [(port, pid)]
    assert "http.server" in found[0].command
    assert listeners({_free_port()}) == []


def test_the_seed_env_file_is_read_and_compared_without_showing_secrets(tmp_path: Path) -> None:
    env = tmp_path / "intelliwatt-smt"
    env.write_bytes(
        f"# by hand\r\nADMIN_TOKEN=\"{TOKEN}\"\r\nSMT_HOST='sftp.example'\r\n"
        "export SOURCE_TAG=adhocusage\r\nSMT_USER=old-user\r\n".encode()
    )
    units = tmp_path / "units"
    units.mkdir()
    (units / "smt-ingest.service").write_text("[Service]\nType=simple\nRestart=always\n")
    (units / "smt-ingest.timer").write_text("[Timer]\nOnBootSec=2m\nOnUnitActiveSec=30m\n")
    (units / "smt-webhook.service").write_text("# Ansible managed\n[Service]\n")
    found, seed = survey(
        env_file=env,
        expected={
            "ADMIN_TOKEN": "another-token",
            "SMT_HOST": "sftp.example",
            "SMT_USER": "smtpeer",
            "SOURCE_TAG": "adhocusage",
            "ESIID_DEFAULT": "",
        },
        unit_dir=units,
        ports=[],
    )
    assert seed["SOURCE_TAG"] == "adhocusage" and seed["ADMIN_TOKEN"] == TOKEN
    assert found.differences == [
        {"key": "ADMIN_TOKEN", "box": "(a different secret)", "inventory": "(vaulted)"},
        {"key": "SMT_USER", "box": "old-user", "inventory": "smtpeer"},
    ]
    assert TOKEN not in str(found.to_dict()) and "another-token" not in str(found.to_dict())
    by_unit = {u.unit: u for u in found.units}
    assert set(by_unit) == {"smt-ingest.service", "smt-ingest.timer"}  # ours is not legacy
    assert by_unit["smt-ingest.service"].faults == [
        "Restart=always on a short-lived pass (it loops)"
    ]
    assert "monotonic timer" in by_unit["smt-ingest.timer"].faults[0]


def test_export_lines_are_only_accepted_when_reading_a_seed_file() -> None:
    with pytest.raises(EnvFileError, match="expected KEY=value"):
        parse_env_text("export SOURCE_TAG=x\n")
    assert parse_env_text("export SOURCE_TAG=x\n", shell_export=True) == {"SOURCE_TAG": "x"}


def test_empty_inventory_values_are_not_compared() -> None:
    assert differences({"ESIID_DEFAULT": "10443720000000001"}, {"ESIID_DEFAULT": ""}) == []
