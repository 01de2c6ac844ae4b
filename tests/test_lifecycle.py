"""The disk over years, in real passes against the real sshd peer and the strict double:
retention (``retention.py``), the free-space guard, remote completion
(``remote_completion.py``) and the ledger's dated copies."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import fast_env

from smt_droplet.config import ConfigError, LifecycleSettings, SftpSettings
from smt_droplet.ingest import run_pass
from smt_droplet.ledger import posts_path, read_retired

ESIID = "10443720000000077"
OTHER = "10443720000000085"
ORPHAN = b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n"  # no ESIID anywhere: needs a person


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    return fast_env(ingest_env, post_retries=1)


def _state(env: dict[str, str], inbox: Path) -> Path:
    return Path(env.get("STATE_FILE") or inbox / ".posted_sha256")


def _messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def _age_posts(state: Path, days: float, path: str | None = None) -> None:
    """Pretend the app accepted every posted file (or the one at ``path``) ``days`` ago (the
    post log's ``at``: one JSON line per post)."""
    log = posts_path(state)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if path is None or record["path"] == path:
            record["at"] = time.time() - days * 86400
    log.write_text("".join(json.dumps(r) + "\n" for r in records))


# -- retention ---------------------------------------------------------------------------------


def test_retention_archives_old_posted_files_and_the_mirror_does_not_fetch_them_again(
    env, inbox: Path, tmp_path: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    remote = smt_csv.write(sftp_peer.root / "adhocusage", esiid=ESIID)
    recent = smt_csv.write(sftp_peer.root, esiid=OTHER, seed=3)
    (sftp_peer.root / "orphan.csv").write_bytes(ORPHAN)
    first = run_pass(env)
    assert first.counts() == {"posted": 2, "no-esiid": 1}
    state = _state(env, inbox)
    rel = f"adhocusage/{remote.name}"
    _age_posts(state, days=40, path=rel)  # the other one was posted just now
    os.utime(inbox / "orphan.csv", (time.time() - 90 * 86400,) * 2)  # old, but never posted

    archive = tmp_path / "archive"
    aged = {**env, "SMT_RETENTION_DAYS": "30", "SMT_ARCHIVE_DIR": str(archive)}
    caplog.set_level(logging.INFO, logger="smt_droplet")
    second = run_pass(aged)
    assert second.exit_code == 0 and second.retired == 1
    assert not (inbox / rel).exists()
    assert (inbox / recent.name).exists() and (inbox / "orphan.csv").exists()
    archived = list(archive.glob(f"*/adhocusage/{remote.name}.gz"))
    assert len(archived) == 1 and gzip.decompress(archived[0].read_bytes()) == remote.read_bytes()
    assert int(archived[0].stat().st_mtime) == int(remote.stat().st_mtime)
    line = _messages(caplog, f"retired {rel}")
    assert len(line) == 1 and "archived to" in line[0] and "posted 40 days ago" in line[0]
    entry = read_retired(state)[rel]
    assert entry[:2] == [remote.stat().st_size, int(remote.stat().st_mtime)]
    assert entry[4] == str(archived[0])

    caplog.clear()
    third = run_pass(aged)  # SFTP still lists it unchanged: not downloaded, not posted
    assert third.exit_code == 0 and third.bytes_downloaded == 0
    assert {f.rel: f.status for f in third.sync.files}[rel] == "retired"
    assert not (inbox / rel).exists() and len(webapp.received()) == 2

    # SMT delivers the same bytes again (new mtime): downloaded, hashed, already posted.
    os.utime(remote, (time.time() - 10, time.time() - 10))
    fourth = run_pass(aged)
    assert fourth.exit_code == 0 and fourth.sync.downloaded[0].rel == rel
    assert fourth.counts().get("posted", 0) == 0 and len(webapp.received()) == 2
    assert rel not in read_retired(state) or read_retired(state)[rel][1] != entry[1]


def test_retention_delete_mode_and_forgetting_paths_sftp_no_longer_lists(
    env, inbox: Path, sftp_peer, smt_csv, webapp
) -> None:
    remote = smt_csv.write(sftp_peer.root, esiid=ESIID)
    assert run_pass(env).counts() == {"posted": 1}
    state = _state(env, inbox)
    _age_posts(state, days=8)
    deleting = {**env, "SMT_RETENTION_DAYS": "7", "SMT_RETENTION_MODE": "delete"}
    assert run_pass(deleting).retired == 1
    assert not (inbox / remote.name).exists()
    assert read_retired(state)[remote.name][4] is None
    assert not (inbox.parent / "smt_archive").exists()

    remote.unlink()  # SMT cleaned up (or remote completion did)
    assert run_pass(deleting).exit_code == 0
    assert read_retired(state) == {}
    assert len(webapp.received()) == 1


# -- the free-space guard ----------------------------------------------------------------------


def test_below_the_free_space_floor_a_pass_downloads_nothing_says_why_and_counts_it(
    env, inbox: Path, tmp_path: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    local = smt_csv.write(inbox, esiid=ESIID, seed=1)  # already here: still posted
    waiting = [smt_csv.write(sftp_peer.root, f"waiting-{s}.csv", OTHER, seed=s) for s in (2, 3)]
    free_mib = shutil.disk_usage(inbox).free // 2**20
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    short = {**env, "SMT_MIN_FREE_MB": str(free_mib + 1024), "SMT_METRICS_DIR": str(metrics)}
    caplog.set_level(logging.INFO, logger="smt_droplet")
    result = run_pass(short)
    assert result.exit_code == 1  # the alerts hear of it
    assert result.bytes_downloaded == 0 and not any(inbox.glob("waiting-*"))
    assert result.counts() == {"posted": 1} and webapp.received()[0]["esiid"] == ESIID
    stopped = _messages(caplog, "downloads stopped:")
    assert len(stopped) == 1 and "2 file(s)" in stopped[0] and f"{free_mib + 1024}" in stopped[0]
    assert {f.status for f in result.sync.files if f.rel != local.name} == {"skipped-no-space"}
    prom = (metrics / "smt_ingest.prom").read_text()
    assert "smt_ingest_last_pass_files_skipped_low_space 2.0" in prom

    roomy = {**env, "SMT_MIN_FREE_MB": "1"}
    after = run_pass(roomy)
    assert after.exit_code == 0 and len(after.sync.downloaded) == len(waiting)


# -- remote completion -------------------------------------------------------------------------


def test_remote_delete_after_the_post_keeps_what_is_not_posted(
    env, inbox: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    posted = smt_csv.write(sftp_peer.root / "adhocusage", esiid=ESIID)
    orphan = sftp_peer.root / "orphan.csv"
    orphan.write_bytes(ORPHAN)
    caplog.set_level(logging.INFO, logger="smt_droplet")
    result = run_pass({**env, "SMT_REMOTE_COMPLETION": "delete"})
    assert result.exit_code == 0 and result.remote_completed == 1
    assert not posted.exists() and orphan.exists()
    assert (inbox / "adhocusage" / posted.name).exists()  # the local copy stays (retention's job)
    assert _messages(caplog, "remote-deleted adhocusage/")
    again = run_pass({**env, "SMT_REMOTE_COMPLETION": "delete"})
    assert again.remote_completed == 0 and len(webapp.received()) == 1


def test_remote_move_failure_is_retried_by_the_next_pass_and_never_posts_again(
    env, inbox: Path, tmp_path: Path, sftp_peer, smt_csv, webapp, caplog
) -> None:
    remote = smt_csv.write(sftp_peer.root / "adhocusage", esiid=ESIID)
    blocker = tmp_path / "remote-archive"
    blocker.write_text("a file where the archive directory should be")
    moving = {
        **env,
        "SMT_REMOTE_COMPLETION": "move",
        "SMT_REMOTE_ARCHIVE_DIR": str(blocker / "done"),
    }
    caplog.set_level(logging.INFO, logger="smt_droplet")
    first = run_pass(moving)
    assert first.exit_code == 0 and first.counts() == {"posted": 1}
    assert first.remote_completion_failed == 1 and remote.exists()
    warned = _messages(caplog, "remote completion of adhocusage/")
    assert len(warned) == 1 and "the next pass tries again" in warned[0]

    blocker.unlink()
    blocker.mkdir()
    second = run_pass(moving)
    assert second.remote_completed == 1 and second.counts().get("posted", 0) == 0
    assert not remote.exists()
    moved = blocker / "done" / "adhocusage" / remote.name
    assert moved.read_bytes() == (inbox / "adhocusage" / remote.name).read_bytes()
    assert len(webapp.received()) == 1


def test_a_file_rewritten_on_sftp_after_its_download_is_not_completed(
    env, inbox: Path, sftp_peer, smt_csv, webapp
) -> None:
    remote = smt_csv.write(sftp_peer.root, esiid=ESIID)
    env = {**env, "SMT_REMOTE_COMPLETION": "delete"}
    assert run_pass({**env, "SMT_REMOTE_COMPLETION": "none"}).counts() == {"posted": 1}
    remote.write_bytes(smt_csv(ESIID, days=2))  # SMT replaced it: new bytes, new mtime
    os.utime(remote, (time.time() - 5, time.time() - 5))
    result = run_pass(env)  # downloads the new bytes, posts them, then deletes the remote file
    assert result.counts() == {"posted": 1} and result.remote_completed == 1
    assert not remote.exists() and len(webapp.received()) == 2


def test_completion_and_retention_settings_are_checked_before_any_traffic(env, inbox) -> None:
    root = env["SMT_REMOTE_DIR"]
    with pytest.raises(ConfigError, match="needs SMT_REMOTE_ARCHIVE_DIR"):
        SftpSettings.from_env({**env, "SMT_REMOTE_COMPLETION": "move"})
    with pytest.raises(ConfigError, match="inside SMT_REMOTE_DIR"):
        SftpSettings.from_env(
            {**env, "SMT_REMOTE_COMPLETION": "move", "SMT_REMOTE_ARCHIVE_DIR": root + "/done"}
        )
    with pytest.raises(ConfigError, match="must be one of none, delete, move"):
        SftpSettings.from_env({**env, "SMT_REMOTE_COMPLETION": "rm"})
    with pytest.raises(ConfigError, match="outside the inbox"):
        LifecycleSettings.from_env({**env, "SMT_ARCHIVE_DIR": str(inbox / "old")})
    with pytest.raises(ConfigError, match="finite"):
        LifecycleSettings.from_env({**env, "SMT_RETENTION_DAYS": "nan"})


# -- dated ledger copies -----------------------------------------------------------------------


def test_the_ledger_is_copied_once_a_day_and_only_the_newest_copies_stay(
    env, inbox: Path, sftp_peer, smt_csv, webapp
) -> None:
    smt_csv.write(sftp_peer.root, esiid=ESIID)
    state = _state(env, inbox)
    copies = state.parent / ".ledger-copies"
    copies.mkdir()
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        (copies / f"{state.name}.{day}").write_text("old\n")
        (copies / f"{state.name}.json.{day}").write_text("{}")
        (copies / f"{state.name}.posts.jsonl.{day}").write_text("")
    keeping = {**env, "SMT_LEDGER_COPIES": "2"}
    assert run_pass(keeping).exit_code == 0
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert sorted(p.name for p in copies.iterdir()) == sorted(
        f"{state.name}{suffix}.{day}"
        for suffix in ("", ".json", ".posts.jsonl")
        for day in ("2026-01-03", today)
    )
    assert (copies / f"{state.name}.{today}").read_bytes() == state.read_bytes()
    log = posts_path(state)
    assert (copies / f"{log.name}.{today}").read_bytes() == log.read_bytes() != b""
    first_copy = (copies / f"{state.name}.{today}").stat().st_mtime_ns
    assert run_pass(keeping).exit_code == 0  # the same day: not copied again
    assert (copies / f"{state.name}.{today}").stat().st_mtime_ns == first_copy
