"""Leftovers swept at pass start (``sweep.py``) and a lost ledger said out loud, in real passes
against the real sshd peer and the strict double."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from helpers import fast_env

from smt_droplet import spool
from smt_droplet.config import SftpSettings
from smt_droplet.ingest import run_pass
from smt_droplet.sync import run_sync

ESIID = "10443720000000077"
HOUR_AGO = time.time() - 3700


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    return fast_env(ingest_env, post_retries=1)


def _old(path: Path, data: bytes | None = b"x") -> Path:
    """``path`` (a file with ``data``, or a directory) last changed more than an hour ago."""
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def test_pass_sweeps_dead_leftovers_older_than_an_hour(
    env, inbox: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    spool_dir = Path(env["SMT_SPOOL_DIR"])
    spool.ensure_layout(spool_dir)
    dead_request = _old(spool_dir / "tmp" / "20261202T000000Z-dead.json.tmp", b"{")
    fresh_request = spool_dir / "tmp" / "being-written.json.tmp"
    fresh_request.write_text("{")
    dead_upload = _old(inbox / ".upload-0123abcd.part", b"half a csv")
    live_upload = inbox / ".upload-live.part"
    live_upload.write_bytes(b"still arriving")
    seed_scratch = inbox / "pgp_tmp.Ab12Cd"
    seed_scratch.mkdir()
    _old(seed_scratch / "IntervalMeterUsage_plaintext.csv", b"ESIID,...\n")
    os.utime(seed_scratch, (HOUR_AGO, HOUR_AGO))
    (inbox / "adhocusage").mkdir()
    kept = _old(inbox / "adhocusage" / "old-but-ours.part")  # not an upload's name: kept
    smt_csv.write(sftp_peer.root, esiid=ESIID)

    with caplog.at_level(logging.INFO, logger="smt_droplet"):
        result = run_pass(env)
    assert result.exit_code == 0 and result.counts()["posted"] == 1  # the SFTP file only
    assert not dead_request.exists() and not dead_upload.exists() and not seed_scratch.exists()
    assert fresh_request.exists() and live_upload.exists() and kept.exists()
    swept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("swept ")]
    assert len(swept) == 3, swept
    assert [r["esiid"] for r in webapp.received()] == [ESIID]  # the scratch CSV never posted


def test_a_lost_ledger_beside_earlier_files_is_said_once_per_pass(
    env, inbox: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    state = Path(env.get("STATE_FILE") or inbox / ".posted_sha256")
    smt_csv.write(sftp_peer.root, esiid=ESIID)
    with caplog.at_level(logging.WARNING, logger="smt_droplet"):
        assert run_pass(env).exit_code == 0  # a first pass on a new box: downloads, no warning
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert state.exists()

    state.unlink()
    state.with_name(state.name + ".json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smt_droplet"):
        result = run_pass(env)
    lost = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(lost) == 1 and "already holds 1 file(s) from before this pass" in lost[0], lost
    assert str(state) in lost[0]
    assert result.counts() == {"duplicate": 1}  # posted again: the app knew it


def test_a_new_droplets_first_files_synced_by_another_process_are_no_lost_ledger(
    env, inbox: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    """ingest-now.yml syncs (one module) then posts (another): the post step never saw the
    download, but nothing was ever posted on this box, so no ledger can have been lost."""
    smt_csv.write(sftp_peer.root, esiid=ESIID)
    assert run_sync(SftpSettings.from_env(env)).downloaded
    with caplog.at_level(logging.WARNING, logger="smt_droplet"):
        assert run_pass(env, sync=False).counts() == {"posted": 1}
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]


def test_a_first_upload_on_a_new_box_is_not_a_lost_ledger(env, inbox: Path, smt_csv, caplog):
    stored = smt_csv.write(inbox, name="20261202T100000_first.csv", esiid=ESIID)
    spool.ensure_layout(Path(env["SMT_SPOOL_DIR"]))
    spool.enqueue(Path(env["SMT_SPOOL_DIR"]), "upload", filename=stored.name, reason="upload")
    with caplog.at_level(logging.WARNING, logger="smt_droplet"):
        assert run_pass(env, sync=False).counts() == {"posted": 1}
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]
