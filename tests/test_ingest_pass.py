"""Whole ingest passes against a real sshd and the strict web-app double."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, cli, fast_env, sha256

from smt_droplet import spool
from smt_droplet.ingest import run_pass
from smt_droplet.ledger import read_posted_digests
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer

IN_NAME = "10443720000000011"
IN_CONTENT = "10443720000000022"
DEFAULT = "10443720000000033"
OLD = time.time() - 3600
OLD_NS = int(OLD) * 1_000_000_000


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    return fast_env(ingest_env, post_retries=3)


def put(peer: SftpPeer, smt_csv, name: str, esiid: str, seed: int = 0, days: int = 1) -> Path:
    path = smt_csv.write(peer.root, name=name, esiid=esiid, seed=seed, days=days)
    os.utime(path, (OLD, OLD))
    return path


@pytest.fixture
def three_files(sftp_peer: SftpPeer, smt_csv) -> dict[str, Path]:
    """ESIID only in the name, only in the content (sub-directory, meter M2), in neither."""
    named = put(sftp_peer, smt_csv, f"IntervalMeterUsage_{IN_NAME}_20250308.csv", IN_NAME, 1)
    content = put(sftp_peer, smt_csv, "exports/interval_M2_week.csv", IN_CONTENT, 2)
    neither = sftp_peer.root / "no_esiid_anywhere.csv"
    neither.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    os.utime(neither, (OLD, OLD))
    # the name-only file's content says another ESIID: the name must win
    named.write_bytes(named.read_bytes().replace(IN_NAME.encode(), b"10443720000000099"))
    os.utime(named, (OLD, OLD))
    return {"named": named, "content": content, "neither": neither}


def by_name(webapp: IntelliWattDouble) -> dict[str, dict]:
    return {r["filename"]: r for r in webapp.received()}


def test_first_pass_posts_each_file_once_with_esiid_and_meter(
    env, three_files, webapp, inbox
) -> None:
    result = run_pass({**env, "ESIID_DEFAULT": DEFAULT})
    assert result.exit_code == 0, result.summary_line()
    got = by_name(webapp)
    assert set(got) == {three_files["named"].name, "interval_M2_week.csv", "no_esiid_anywhere.csv"}
    assert got[three_files["named"].name]["esiid"] == IN_NAME
    assert got["interval_M2_week.csv"]["esiid"] == IN_CONTENT
    assert got["interval_M2_week.csv"]["meter"] == "M2"
    assert got["no_esiid_anywhere.csv"]["esiid"] == DEFAULT
    assert got["no_esiid_anywhere.csv"]["meter"] == "M1"
    assert len(webapp.received()) == 3 and not webapp.pull_triggers()
    for record in webapp.received():
        assert (
            record["content"]
            == (
                inbox
                / (
                    "exports/" + record["filename"]
                    if "M2" in record["filename"]
                    else record["filename"]
                )
            ).read_bytes()
        )
    ledger = read_posted_digests(inbox / ".posted_sha256")
    assert ledger == {sha256(p) for p in three_files.values()}


def test_no_esiid_needs_an_operator_without_failing_passes(
    env, three_files, webapp, inbox, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="smt_droplet")
    first = run_pass(env)
    assert first.exit_code == 0  # a person must decide; retrying every 30 min cannot help
    assert "no_esiid_anywhere.csv" not in by_name(webapp)
    row = {f.path: f for f in first.files}["no_esiid_anywhere.csv"]
    assert row.outcome == "no-esiid" and row.needs_operator and not row.reported_before
    assert "post no_esiid_anywhere.csv --esiid" in row.reason and "ignore" in row.reason
    assert "needs-operator=1" in first.summary_line()
    warned = [r for r in caplog.records if "no_esiid_anywhere.csv needs an operator" in r.message]
    assert [r.levelno for r in warned] == [logging.WARNING]
    caplog.clear()
    second = run_pass(env)  # reported once: later passes count it, at DEBUG
    assert second.exit_code == 0
    again = {f.path: f for f in second.files}["no_esiid_anywhere.csv"]
    assert again.outcome == "no-esiid" and again.reported_before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    third = run_pass({**env, "ESIID_DEFAULT": DEFAULT})  # attributed again on every pass
    assert third.exit_code == 0 and third.needing_operator() == []
    assert [r["filename"] for r in webapp.received()][-1] == "no_esiid_anywhere.csv"


def test_second_pass_posts_nothing_new_file_only_it(
    env, three_files, webapp, sftp_peer, smt_csv
) -> None:
    env = {**env, "ESIID_DEFAULT": DEFAULT}
    run_pass(env)
    assert len(webapp.requests()) == 3
    second = run_pass(env)
    assert second.exit_code == 0 and len(webapp.requests()) == 3
    assert second.counts() == {"skipped-already-posted": 3}
    put(sftp_peer, smt_csv, f"IntervalMeterUsage_{IN_NAME}_20250309.csv", IN_NAME, 7)
    third = run_pass(env)
    assert third.counts() == {"skipped-already-posted": 3, "posted": 1}
    assert len(webapp.requests()) == 4
    assert [r["filename"] for r in webapp.received()[3:]] == [
        f"IntervalMeterUsage_{IN_NAME}_20250309.csv"
    ]


def test_changed_host_key_refuses_and_posts_nothing(
    env, three_files, webapp, sftp_peer, inbox, smt_csv
) -> None:
    smt_csv.write(inbox, name=f"upload_{IN_NAME}.csv", esiid=IN_NAME)  # already local
    sftp_peer.rotate_host_key()
    result = run_pass(env)
    assert result.exit_code == 2 and "CHANGED" in (result.fatal or "")
    assert webapp.requests() == []
    assert not (inbox / ".posted_sha256").exists()


def test_500_twice_then_200_posts_once(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    put(sftp_peer, smt_csv, f"a_{IN_NAME}.csv", IN_NAME)
    webapp.fail_next(2, 500)
    result = run_pass(env)
    assert result.exit_code == 0 and result.counts() == {"posted": 1}
    assert len(webapp.requests()) == 3 and len(webapp.received()) == 1
    assert len(read_posted_digests(inbox / ".posted_sha256")) == 1


def test_retries_exhausted_leave_file_for_next_pass(env, sftp_peer, smt_csv, webapp) -> None:
    put(sftp_peer, smt_csv, f"a_{IN_NAME}.csv", IN_NAME)
    webapp.fail_next(4, 503 - 1)  # 502, four times = all attempts
    first = run_pass(env)
    assert first.exit_code == 1 and first.counts() == {"failed-will-retry": 1}
    second = run_pass(env)
    assert second.exit_code == 0 and second.counts() == {"posted": 1}


def test_401_stops_the_pass_and_leaves_ledger_untouched(env, three_files, webapp, inbox) -> None:
    state = inbox / ".posted_sha256"
    state.write_text("0" * 64 + "\n")
    before = state.read_bytes()
    result = run_pass({**env, "ADMIN_TOKEN": "not-the-token", "ESIID_DEFAULT": DEFAULT})
    assert result.exit_code == 2
    assert len(webapp.requests()) == 1  # stopped at the first 401
    assert webapp.received() == []
    assert state.read_bytes() == before


def test_oversized_file_is_marked_and_never_sent(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    big = sftp_peer.root / f"big_{IN_NAME}.csv"
    # CSV text that gzip cannot shrink under the cap (random hex).
    big.write_text("ID,VALUE\n" + "".join(f"{i},{os.urandom(64).hex()}\n" for i in range(20_000)))
    os.utime(big, (OLD, OLD))
    put(sftp_peer, smt_csv, f"small_{IN_NAME}.csv", IN_NAME)
    env = {**env, "SMT_MAX_BODY_BYTES": "1000000"}
    first = run_pass(env)
    assert first.counts() == {"too-large": 1, "posted": 1} and first.exit_code == 0
    reason = {f.path: f.reason for f in first.files}[big.name]
    assert "cap=1000000" in reason and "body=" in reason
    second = run_pass(env)
    assert second.counts() == {"skipped-too-large": 1, "skipped-already-posted": 1}
    assert len(webapp.requests()) == 1
    assert [r["filename"] for r in webapp.received()] == [f"small_{IN_NAME}.csv"]


def test_rejected_file_is_not_retried_until_forgotten(
    env, sftp_peer, smt_csv, webapp, inbox
) -> None:
    path = put(sftp_peer, smt_csv, f"a_{IN_NAME}.csv", IN_NAME)
    webapp.fail_next(1, 400, body={"ok": False, "error": "INLINE_SIZE_MISMATCH"})
    first = run_pass(env)
    assert first.counts() == {"rejected": 1} and first.files[0].reason.startswith(
        "INLINE_SIZE_MISMATCH: the app decoded"
    )
    assert run_pass(env).counts() == {"skipped-rejected": 1}
    assert len(webapp.requests()) == 1
    cli = subprocess.run(
        [sys.executable, "-m", "smt_droplet", "forget", str(inbox / path.name)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert run_pass(env).counts() == {"posted": 1}


def test_growing_remote_file_is_not_posted_that_pass(env, sftp_peer, webapp, inbox) -> None:
    growing = sftp_peer.root / f"IntervalMeterUsage_{IN_NAME}_grow.csv"
    growing.write_bytes(b"ESIID,USAGE_KWH\n" + b"'10443720000000011,1.0\n" * 800_000)
    stop = threading.Event()

    def writer() -> None:
        with open(growing, "ab") as fh:
            while not stop.is_set():
                fh.write(b"'10443720000000011,2.0\n" * 50)
                fh.flush()
                time.sleep(0.002)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        first = run_pass(env)
    finally:
        stop.set()
        thread.join()
    assert first.exit_code == 0 and webapp.requests() == []
    assert [f.status for f in first.sync.files] == ["skipped-growing"]
    os.utime(growing, (OLD, OLD))
    second = run_pass(env)
    assert second.counts() == {"posted": 1}
    assert webapp.received()[0]["content"] == growing.read_bytes()


def test_existing_old_ledger_is_honoured(env, three_files, webapp, inbox, sftp_peer) -> None:
    # An old droplet: files already mirrored and posted, CRLF ledger from a Windows editor.
    for p in three_files.values():
        target = inbox / p.relative_to(sftp_peer.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    digests = [sha256(p) for p in three_files.values()]
    (inbox / ".posted_sha256").write_bytes("".join(d + "\r\n" for d in digests[:2]).encode())
    result = run_pass({**env, "ESIID_DEFAULT": DEFAULT})
    assert result.exit_code == 0
    assert [r["sha256"] for r in webapp.received()] == [digests[2]]


def test_sync_failure_still_posts_local_files_and_exits_1(env, smt_csv, webapp, inbox) -> None:
    smt_csv.write(inbox, name=f"upload_{IN_NAME}.csv", esiid=IN_NAME)
    result = run_pass({**env, "SMT_PORT": "1", "SMT_SFTP_RETRIES": "0"})
    assert result.exit_code == 1 and result.sync_error
    assert result.counts() == {"posted": 1}


def test_spool_requests_steer_and_are_consumed(env, smt_csv, webapp, inbox, tmp_path) -> None:
    queue_dir = Path(env["SMT_SPOOL_DIR"])
    spool.ensure_layout(queue_dir)
    smt_csv.write(inbox, name=f"posted_before_{IN_NAME}.csv", esiid=IN_NAME, seed=3)
    anon = inbox / "customer_upload.csv"
    anon.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    other = inbox / "other_upload.csv"
    other.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/9/2025,2.0\n")
    assert run_pass({**env, "ESIID_DEFAULT": DEFAULT}, sync=False).counts()["posted"] == 3
    webapp.reset()
    (inbox / ".posted_sha256").write_text(sha256(inbox / f"posted_before_{IN_NAME}.csv") + "\n")
    spool.enqueue(queue_dir, "webhook", esiid=IN_CONTENT, meter="M4", force_repost=True)
    spool.enqueue(queue_dir, "upload", filename="other_upload.csv", esiid=IN_NAME)
    result = run_pass(env, sync=False)
    assert result.requests == 2
    got = by_name(webapp)
    # The trigger's ESIID is for files its pass downloads: none here, so the waiting upload
    # without an ESIID of its own is not attributed to it (it stays no-esiid: an operator's).
    assert "customer_upload.csv" not in got
    assert {f.path: f.outcome for f in result.files}["customer_upload.csv"] == "no-esiid"
    assert got["other_upload.csv"]["esiid"] == IN_NAME  # the upload's own ESIID
    assert f"posted_before_{IN_NAME}.csv" in got  # force_repost re-posted a ledger file
    assert spool.depth(queue_dir) == 0 and not list((queue_dir / "processing").iterdir())
    last = spool.read_last_result(queue_dir)
    # the app was reset, so both posted files are new to it again
    assert last is not None and last["exit_code"] == 0 and last["needs_operator"] == 1
    assert last["counts"] == {"posted": 2, "no-esiid": 1}
    assert "finished_at" in last and last["requests"] == 2


def test_a_trigger_esiid_never_attributes_a_waiting_upload(
    env, sftp_peer, smt_csv, webapp, inbox
) -> None:
    """Data integrity: customer A's upload (no ESIID in name, content or form) waits in the inbox;
    a trigger for customer B's ESIID arrives. B's ESIID applies only to what B's pass downloads
    from SFTP; A's file stays no-esiid and is never posted under B."""
    queue_dir = Path(env["SMT_SPOOL_DIR"])
    spool.ensure_layout(queue_dir)
    waiting = inbox / "20260101T000000_customer_a.csv"
    waiting.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    spool.enqueue(queue_dir, "upload", filename=waiting.name)  # the upload named no ESIID
    fresh = sftp_peer.root / "interval_export.csv"  # no ESIID of its own either
    fresh.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/9/2025,2.0\n")
    os.utime(fresh, (OLD, OLD))
    spool.enqueue(queue_dir, "webhook", esiid=IN_CONTENT, meter="M4", reason="customer B")
    result = run_pass(env)
    outcomes = {f.path: (f.outcome, f.esiid) for f in result.files}
    assert outcomes[waiting.name] == ("no-esiid", None)
    assert outcomes["interval_export.csv"] == ("posted", IN_CONTENT)
    got = by_name(webapp)
    assert set(got) == {"interval_export.csv"} and got["interval_export.csv"]["meter"] == "M4"
    # The next timer pass (no request) does not attribute it either.
    again = run_pass(env)
    assert {f.path: f.outcome for f in again.files}[waiting.name] == "no-esiid"
    assert set(by_name(webapp)) == {"interval_export.csv"}


def test_conflicting_spool_esiids_are_not_used(env, webapp, inbox) -> None:
    queue_dir = Path(env["SMT_SPOOL_DIR"])
    spool.ensure_layout(queue_dir)
    (inbox / "anon.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    spool.enqueue(queue_dir, "webhook", esiid=IN_NAME)
    spool.enqueue(queue_dir, "webhook", esiid=IN_CONTENT)
    result = run_pass(env, sync=False)
    assert result.counts() == {"no-esiid": 1} and webapp.requests() == []
    assert spool.depth(queue_dir) == 0  # consumed anyway: no .path loop
    last = spool.read_last_result(queue_dir)
    assert last is not None and last["exit_code"] == 0 and last["needs_operator"] == 1


# -- the command line -------------------------------------------------------------------------


def test_cli_ingest_with_env_file_logs_per_file_and_never_the_token(
    env, three_files, webapp, tmp_path
) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(
        "".join(f'{k}="{v}"\r\n' for k, v in {**env, "ESIID_DEFAULT": DEFAULT}.items())
    )
    proc = cli(["ingest", "--env-file", str(env_file)], {})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert f"posted IntervalMeterUsage_{IN_NAME}_20250308.csv esiid={IN_NAME} meter=M1" in err
    assert "sha256=" in err and "id=" in err
    assert "summary posted=3 duplicate=0" in err
    assert env["ADMIN_TOKEN"] not in err + proc.stdout
    again = cli(["ingest", "--env-file", str(env_file)], {})
    assert again.returncode == 0 and "skipped-already-posted=3" in again.stderr


def test_cli_missing_setting_exits_2_before_network(env, webapp) -> None:
    partial = {k: v for k, v in env.items() if k != "SMT_HOST"}
    proc = cli(["ingest"], partial)
    assert proc.returncode == 2 and "SMT_HOST is not set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli(["ingest"], {**env, "SMT_KEY": "/nonexistent/key"})
    assert proc.returncode == 2 and "SMT_KEY" in proc.stderr
    assert webapp.requests() == []


def test_cli_ingest_without_aiohttp(env, three_files, webapp, tmp_path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "aiohttp.py").write_text("raise ImportError('aiohttp must not be imported')\n")
    proc = cli(
        ["ingest"],
        {**env, "ESIID_DEFAULT": DEFAULT, "PYTHONPATH": f"{blocker}:{REPO / 'src'}"},
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_status_post_and_forget(env, smt_csv, webapp, inbox) -> None:
    path = smt_csv.write(inbox, name="manual.csv", esiid=IN_NAME)
    status = json.loads(cli(["status", "--json"], env).stdout)
    assert [(f["path"], f["state"]) for f in status["files"]] == [("manual.csv", "pending")]
    proc = cli(["post", str(path), "--esiid", IN_CONTENT, "--meter", "M7"], env)
    assert proc.returncode == 0, proc.stderr
    record = webapp.received()[0]
    assert (record["esiid"], record["meter"]) == (IN_CONTENT, "M7")
    again = cli(["post", str(path)], env)
    assert again.returncode == 0 and "skipped-already-posted" in again.stderr
    assert len(webapp.requests()) == 1
    status = json.loads(cli(["status", "--json"], env).stdout)
    assert status["files"][0]["state"] == "posted" and status["files"][0]["app_id"] == "1"
    assert cli(["forget", sha256(path)], env).returncode == 0
    assert read_posted_digests(inbox / ".posted_sha256") == set()
    assert cli(["post", str(path)], env).returncode == 0
    assert webapp.received()[-1]["duplicate"] is True
    human = cli(["status"], env).stdout
    assert "posted" in human and "manual.csv" in human
    assert cli(["post", str(path), "--esiid", "123"], env).returncode == 2


def test_unchanged_files_are_not_rehashed(env, smt_csv, webapp, inbox) -> None:
    """The (path, size, mtime) cache is used: same-size rewrite with the old mtime goes unseen,
    a real change (new mtime) is noticed and posted."""
    path = smt_csv.write(inbox, name=f"a_{IN_NAME}.csv", esiid=IN_NAME)
    assert run_pass(env, sync=False).counts() == {"posted": 1}
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(data.replace(b"Consumption", b"CONSUMPTION", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_pass(env, sync=False).counts() == {"skipped-already-posted": 1}
    os.utime(path, (OLD, OLD))
    assert run_pass(env, sync=False).counts() == {"posted": 1}
    assert len(webapp.received()) == 2


def test_cli_sync_only_downloads(env, three_files, webapp, inbox, sftp_peer) -> None:
    proc = cli(["sync"], env)
    assert proc.returncode == 0, proc.stderr
    assert "summary downloaded=3" in proc.stderr
    assert (inbox / "exports" / "interval_M2_week.csv").is_file()
    assert webapp.requests() == []
    sftp_peer.rotate_host_key()
    proc = cli(["sync"], env)
    assert proc.returncode == 2 and "CHANGED" in proc.stderr and "ssh-keygen -R" in proc.stderr


def test_unwritable_ledger_location_is_a_config_error(env, smt_csv, webapp, inbox) -> None:
    smt_csv.write(inbox, name=f"a_{IN_NAME}.csv", esiid=IN_NAME)
    proc = cli(["ingest", "--no-sync"], {**env, "STATE_FILE": "/nonexistent/dir/posted"})
    assert proc.returncode == 2 and "/nonexistent/dir" in proc.stderr
    assert webapp.requests() == []


def test_content_rewritten_under_same_size_and_mtime_is_hashed_again_next_pass(
    env, webapp, inbox
) -> None:
    """The cached digest of a file that changed under an unchanged (size, mtime) is dropped for
    good: the next pass hashes it again and posts it (it used to fail on every pass)."""
    path = inbox / "rewritten.csv"
    path.write_bytes(b"XSIID,USAGE_KWH\n'10443720000000022,1.0\n")  # no ESIID column
    os.utime(path, ns=(OLD_NS, OLD_NS))
    first = run_pass(env, sync=False)
    assert [f.outcome for f in first.files] == ["no-esiid"]

    path.write_bytes(b"ESIID,USAGE_KWH\n'10443720000000022,1.0\n")  # same size, same mtime
    os.utime(path, ns=(OLD_NS, OLD_NS))
    second = run_pass(env, sync=False)
    assert [(f.outcome, f.reason) for f in second.files] == [
        ("failed-will-retry", "content changed while reading")
    ]

    third = run_pass(env, sync=False)
    assert [(f.outcome, f.esiid) for f in third.files] == [("posted", "10443720000000022")]
    assert sha256(path) in read_posted_digests(inbox / ".posted_sha256")
    assert [r["filename"] for r in webapp.received()] == ["rewritten.csv"]
