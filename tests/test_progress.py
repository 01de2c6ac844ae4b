"""Progress in a terminal (progress.py): a real pseudo-terminal as stderr shows tqdm's bar with
bytes and rate; a pipe (the journal's case) gets one line per file and no bar."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest
from helpers import cli_env, fast_env

ESIID = "10443720000000011"
OLD = time.time() - 3600

pytest.importorskip("tqdm")


def run_on_tty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m smt_droplet ARGS`` with stderr on a pty; returns (rc, what it printed)."""
    leader, follower = pty.openpty()
    environ = cli_env(env)
    for name in ("INVOCATION_ID", "JOURNAL_STREAM", "SMT_NO_PROGRESS"):
        environ.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "smt_droplet", *args],
        env={**environ, "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_sync_on_a_terminal_shows_bytes_and_rate(ingest_env, sftp_peer, smt_csv) -> None:
    env = fast_env(ingest_env)
    for i in range(3):
        path = smt_csv.write(sftp_peer.root, name=f"IntervalMeterUsage_{ESIID}_{i}.csv", days=60)
        os.utime(path, (OLD, OLD))
    rc, shown = run_on_tty(["sync"], env)
    assert rc == 0, shown
    assert "sync 3 file(s)" in shown and "B/s" in shown, shown  # tqdm's bar: bytes, rate
    assert "summary downloaded=3" in shown  # the log line printed above the bar


def test_without_a_terminal_there_is_no_bar(ingest_env, sftp_peer, smt_csv) -> None:
    env = fast_env(ingest_env)
    path = smt_csv.write(sftp_peer.root, name=f"IntervalMeterUsage_{ESIID}_9.csv", days=30)
    os.utime(path, (OLD, OLD))
    proc = subprocess.run(
        [sys.executable, "-m", "smt_droplet", "ingest"],
        env=cli_env(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "B/s" not in proc.stderr and "it/s" not in proc.stderr and "\r" not in proc.stderr
    assert "posted IntervalMeterUsage_" in proc.stderr


def test_a_pass_on_a_terminal_counts_files(ingest_env, inbox, smt_csv, webapp) -> None:
    env = fast_env(ingest_env)
    for i in range(4):
        smt_csv.write(inbox, name=f"IntervalMeterUsage_{ESIID}_{i}.csv", seed=i)
    rc, shown = run_on_tty(["ingest", "--no-sync"], env)
    assert rc == 0, shown
    assert "post: " in shown and "/4" in shown and "file" in shown, shown
