"""SIGKILL at bad moments, and passes started at the same time.

Invariants checked after every crash: the ledger never holds a digest the app did not accept,
no partial file ever reaches the app, and after one clean pass every file has been stored by
the app exactly once (``posted()`` excludes the app's duplicate answers) and is in the ledger.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import fast_env, start_cli

from smt_droplet.ingest import run_pass
from smt_droplet.ledger import read_posted_digests
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer

ESIID = "10443720000000011"
OLD = time.time() - 3600


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    return fast_env(ingest_env, lock_wait=60)


def remote_files(peer: SftpPeer, smt_csv, count: int = 4) -> dict[str, str]:
    """name → sha256 of small SMT files on the SFTP peer."""
    out = {}
    for i in range(count):
        path = smt_csv.write(peer.root, name=f"IntervalMeterUsage_{ESIID}_{i}.csv", seed=i)
        os.utime(path, (OLD, OLD))
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def big_remote_file(peer: SftpPeer, megabytes: int) -> tuple[str, str]:
    """A large but very compressible CSV (posts fine gzip'ed); returns (name, sha256)."""
    line = f"'{ESIID},3/8/2025,3/10/2025 1:05,0:00,0:15,0.207,A,Consumption\n".encode()
    data = b"ESIID,USAGE_DATE\n" + line * (megabytes * 1_000_000 // len(line))
    path = peer.root / f"IntervalMeterUsage_{ESIID}_big.csv"
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path.name, hashlib.sha256(data).hexdigest()


def start_pass(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return start_cli(["ingest", *extra], env)


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


def wait_for(predicate, timeout: float = 20.0, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def check_invariants(webapp: IntelliWattDouble, inbox: Path, expected: dict[str, str]) -> None:
    accepted = {r["sha256"] for r in webapp.received()}
    assert read_posted_digests(inbox / ".posted_sha256") <= accepted  # never unaccepted
    assert accepted <= set(expected.values())  # never a partial or foreign file


def check_exactly_once(webapp: IntelliWattDouble, inbox: Path, expected: dict[str, str]) -> None:
    stored = Counter(r["sha256"] for r in webapp.posted())
    assert stored == Counter(set(expected.values()))
    assert read_posted_digests(inbox / ".posted_sha256") == set(expected.values())
    assert not [p for p in inbox.rglob(".*.partial")]


def test_sigkill_during_download(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    expected = remote_files(sftp_peer, smt_csv)
    name, digest = big_remote_file(sftp_peer, 50)
    expected[name] = digest
    proc = start_pass(env)
    try:
        caught = wait_for(lambda: any(inbox.glob(f".{name}.*.partial")))
    finally:
        kill(proc)
    assert caught, "the download finished before we could kill it"
    assert not (inbox / name).exists()  # the partial never got the real name
    assert webapp.requests() == []
    check_invariants(webapp, inbox, expected)
    result = run_pass(env)
    assert result.exit_code == 0, result.summary_line()
    check_exactly_once(webapp, inbox, expected)
    assert hashlib.sha256((inbox / name).read_bytes()).hexdigest() == digest


def test_sigkill_during_post(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    expected = remote_files(sftp_peer, smt_csv)
    webapp.stall_next(1, 1.5)
    proc = start_pass(env)
    try:
        # the double pops the stall when the first POST has arrived (its body read)
        caught = wait_for(lambda: not webapp._stalls)
    finally:
        kill(proc)
    assert caught
    check_invariants(webapp, inbox, expected)
    assert read_posted_digests(inbox / ".posted_sha256") == set()
    wait_for(lambda: len(webapp.requests()) >= 1, timeout=5)  # the stalled one completes
    result = run_pass(env)
    assert result.exit_code == 0, result.summary_line()
    check_exactly_once(webapp, inbox, expected)


def test_sigkill_at_random_instants(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    expected = remote_files(sftp_peer, smt_csv, count=12)
    rng = random.Random(20251126)
    for _ in range(6):
        proc = start_pass(env)
        time.sleep(rng.uniform(0.2, 0.9))
        kill(proc)
        check_invariants(webapp, inbox, expected)
        # every file in the inbox is whole: it has exactly one of the expected digests
        for path in inbox.glob("*.csv"):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[path.name]
    result = run_pass(env)
    assert result.exit_code == 0, result.summary_line()
    check_exactly_once(webapp, inbox, expected)


def test_two_passes_at_once_post_each_file_once(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    expected = remote_files(sftp_peer, smt_csv, count=6)
    webapp.stall_next(1, 0.5)  # make the first pass hold the lock a while
    procs = [start_pass(env), start_pass(env)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(webapp.received()) == len(expected)  # not even duplicate answers
    check_exactly_once(webapp, inbox, expected)


def test_busy_lock_with_no_wait_exits_0(env, sftp_peer, smt_csv, webapp, inbox) -> None:
    expected = remote_files(sftp_peer, smt_csv, count=2)
    webapp.stall_next(1, 2.0)
    first = start_pass(env)
    try:
        assert wait_for(lambda: not webapp._stalls)
        second = start_pass({**env, "SMT_LOCK_WAIT": "0"})
        _, err = second.communicate(timeout=30)
        assert second.returncode == 0
        assert "another pass is running (pid" in err and "not starting" in err
        _, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
    finally:
        kill(first)
    check_exactly_once(webapp, inbox, expected)
