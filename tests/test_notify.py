"""Alerts without a monitoring stack (notify.py), against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import AlertReceiver, cli

from smt_droplet import spool


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    r = AlertReceiver()
    yield r
    r.stop()


@pytest.fixture
def env(tmp_path: Path, receiver: AlertReceiver) -> dict[str, str]:
    spool_dir = tmp_path / "spool"
    spool.ensure_layout(spool_dir)
    return {
        "SMT_NOTIFY_URL": receiver.url,
        "SMT_NOTIFY_TOPIC": "smt-alerts",
        "SMT_NOTIFY_STATE": str(tmp_path / "notify" / "sent.json"),
        "SMT_SPOOL_DIR": str(spool_dir),
        "SMT_STALE_AFTER": "3600",
        "SMT_NOTIFY_REPEAT": "600",
    }


def record(env: dict[str, str], **fields: object) -> None:
    base = {"exit_code": 0, "finished_at": "2026-12-02T10:00:00Z", "trigger": "systemd"}
    spool.write_last_result(Path(env["SMT_SPOOL_DIR"]), {**base, **fields})


def test_a_failed_unit_alerts_once_per_repeat_interval(env, receiver) -> None:
    record(env, exit_code=1, sync_error="connection refused", counts={"not-attempted": 0})
    proc = cli(["notify", "failure", "smt-ingest.service"], env)
    assert proc.returncode == 0, proc.stderr
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["title"].endswith("smt-ingest.service failed") and body["topic"] == "smt-alerts"
    assert body["text"].startswith("*SMT droplet") and body["content"].startswith("**SMT")
    assert "The SFTP sync failed." in body["message"]
    assert "journalctl -u smt-ingest.service" in body["message"]
    assert "SECRETPART" not in json.dumps(body) + proc.stderr  # the URL is a secret too
    assert cli(["notify", "failure", "smt-ingest.service"], env).returncode == 0
    assert len(receiver.bodies) == 1  # not repeated within SMT_NOTIFY_REPEAT
    assert cli(["notify", "failure", "smt-upload-server.service"], env).returncode == 0
    assert len(receiver.bodies) == 2  # another unit is another alert


def test_check_alerts_on_stale_then_says_recovered(env, receiver) -> None:
    record(env, exit_code=0, last_success_ts=time.time() - 7200)
    assert cli(["notify", "check"], env).returncode == 0
    assert [b["title"].split(": ", 1)[1] for b in receiver.bodies] == [
        "no successful ingest pass for 2.0 h"
    ]
    assert cli(["notify", "check"], env).returncode == 0 and len(receiver.bodies) == 1
    record(env, exit_code=0, last_success_ts=time.time())
    assert cli(["notify", "check"], env).returncode == 0
    assert receiver.bodies[-1]["title"].endswith("ingest is healthy again")
    assert cli(["notify", "check"], env).returncode == 0 and len(receiver.bodies) == 2


def test_check_reports_files_that_need_an_operator(env, receiver) -> None:
    files = [{"path": "adhoc/orphan.csv", "needs_operator": True, "outcome": "no-esiid"}]
    record(env, last_success_ts=time.time(), needs_operator=1, files=files)
    assert cli(["notify", "check"], env).returncode == 0
    message = receiver.bodies[0]["message"]
    assert "1 file(s) need an operator decision: adhoc/orphan.csv" in message
    assert "smt-droplet status" in message


def test_delivery_failure_and_bad_settings(env, receiver, tmp_path) -> None:
    receiver.status = 500
    record(env, exit_code=2, fatal="HTTP 401")
    proc = cli(["notify", "check"], env)
    assert proc.returncode == 1 and "HTTP 500" in proc.stderr
    assert "SECRETPART" not in proc.stderr
    receiver.status = 200
    assert cli(["notify", "check"], env).returncode == 0  # not recorded as sent: tried again
    assert len(receiver.bodies) == 2
    bad = cli(["notify", "check"], {**env, "SMT_NOTIFY_URL": "http://example.com/hook"})
    assert bad.returncode == 2 and "https" in bad.stderr
    assert cli(["notify", "check"], {"SMT_SPOOL_DIR": env["SMT_SPOOL_DIR"]}).returncode == 2
    unreachable = {**env, "SMT_NOTIFY_URL": "http://127.0.0.1:9/x"}
    proc = cli(["notify", "failure", "smt-webhook.service"], unreachable)
    assert proc.returncode == 1 and "unreachable" in proc.stderr


def test_file_names_cannot_ping_a_room_or_move_a_cursor(env, receiver) -> None:
    files = [
        {"path": "<!channel> call @here now.csv", "needs_operator": True, "outcome": "no-esiid"},
        {"path": "red\x1b[31m.csv", "needs_operator": True, "outcome": "no-esiid"},
    ]
    record(env, last_success_ts=time.time(), needs_operator=2, files=files)
    assert cli(["notify", "check"], env).returncode == 0
    body = receiver.bodies[0]
    assert "<!channel>" not in body["text"] and "&lt;!channel&gt; call" in body["text"]
    assert body["allowed_mentions"] == {"parse": []}  # Discord: @here pings nobody
    for field in ("text", "content", "message", "title"):
        assert "\x1b" not in body[field], field
    assert "red\\x1b[31m.csv" in body["message"]
