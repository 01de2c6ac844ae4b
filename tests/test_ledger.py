"""The ledger file (old droplets' format), its sidecar, and the pass lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

from smt_droplet import ledger as ledger_module
from smt_droplet.ledger import (
    Ledger,
    LedgerError,
    append_posted,
    posts_path,
    read_post_records,
    read_posted_digests,
    remove_digests,
    sidecar_path,
)
from smt_droplet.lock import LockBusy, PassLock, lock_path_for


def fake(n: int) -> str:
    """A well-formed digest that stands for file number n."""
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_read_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_posted_digests(tmp_path / "nope") == set()


def test_read_tolerates_crlf_blank_upper_and_garbage(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    text = f"{fake(1)}\r\n\r\n  {fake(2).upper()}  \nnot-a-digest\n{fake(3)[:-1]}\n"
    state.write_bytes(text.encode() + b"\xff\xfe\n" + fake(4).encode())
    assert read_posted_digests(state) == {fake(1), fake(2), fake(4)}


def test_append_writes_one_line_per_digest_in_old_format(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    append_posted(state, fake(1))
    append_posted(state, fake(2).upper())
    assert state.read_text() == f"{fake(1)}\n{fake(2)}\n"


def test_append_after_torn_line_does_not_swallow_the_new_digest(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    state.write_text(f"{fake(1)}\n{fake(2)[:20]}")  # killed mid-write by some older tool
    append_posted(state, fake(3))
    assert read_posted_digests(state) == {fake(1), fake(3)}


def test_append_rejects_non_digests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        append_posted(tmp_path / "s", "abc")


def test_remove_rewrites_atomically_and_keeps_mode(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    state.write_text(f"{fake(1)}\r\n{fake(2)}\n{fake(1)}\ngarbage\n")
    os.chmod(state, 0o640)
    inode = state.stat().st_ino
    assert remove_digests(state, {fake(1)}) == 2
    assert state.read_text() == f"{fake(2)}\n"
    assert stat.S_IMODE(state.stat().st_mode) == 0o640
    assert state.stat().st_ino != inode  # replaced by rename, never truncated in place
    assert [p.name for p in tmp_path.iterdir()] == [".posted_sha256"]  # no temp left


def test_remove_of_unknown_digest_leaves_file_alone(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    state.write_text(f"{fake(1)}\n")
    inode = state.stat().st_ino
    assert remove_digests(state, {fake(9)}) == 0
    assert state.stat().st_ino == inode


def test_ledger_records_and_sidecar_roundtrip(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    ledger = Ledger.load(state)
    ledger.remember_digest("a.csv", 10, 123, fake(1))
    ledger.record_posted(fake(1), "a.csv", "42", duplicate=False)
    ledger.record_outcome(fake(2), "rejected", "MISSING_ESIID", "b.csv")
    # The ledger line is durable before save() is ever called.
    assert read_posted_digests(state) == {fake(1)}
    ledger.save()
    again = Ledger.load(state)
    assert again.is_posted(fake(1))
    assert again.cached_digest("a.csv", 10, 123) == fake(1)
    assert again.cached_digest("a.csv", 11, 123) is None  # size changed → re-hash
    assert again.cached_digest("a.csv", 10, 124) is None  # mtime changed → re-hash
    assert again.apps[fake(1)]["id"] == "42"
    outcome = again.outcome(fake(2))
    assert outcome is not None and outcome.status == "rejected"
    assert outcome.reason == "MISSING_ESIID"


def test_forget_clears_ledger_and_outcome(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    ledger = Ledger.load(state)
    ledger.record_posted(fake(1), "a.csv", "1", duplicate=False)
    ledger.record_posted(fake(2), "b.csv", "2", duplicate=False)
    ledger.record_outcome(fake(3), "too-large", "body=9 cap=1", "c.csv")
    assert ledger.forget({fake(1), fake(3)}) == 1
    ledger.save()
    assert read_posted_digests(state) == {fake(2)}
    again = Ledger.load(state)
    assert not again.is_posted(fake(1)) and again.outcome(fake(3)) is None


def test_posts_go_to_the_post_log_and_a_pass_never_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The post records grow with every post for years: they are appended to the post log, one
    JSON line each; the sidecar, which every pass loads and rewrites, does not carry them."""
    state = tmp_path / ".posted_sha256"
    ledger = Ledger.load(state)
    for n in range(1, 4):
        ledger.remember_digest(f"{n}.csv", 10, 123, fake(n))
        ledger.record_posted(fake(n), f"{n}.csv", str(n), duplicate=False, extra={"esiid": "1"})
    ledger.save()
    lines = posts_path(state).read_text().splitlines()
    assert [json.loads(line)["sha256"] for line in lines] == [fake(1), fake(2), fake(3)]
    sidecar = json.loads(sidecar_path(state).read_text())
    assert "posted" not in sidecar and set(sidecar["hashes"]) == {"1.csv", "2.csv", "3.csv"}
    size = sidecar_path(state).stat().st_size

    def unread(_: Path) -> dict[str, Any]:
        raise AssertionError("a pass read the post log")

    monkeypatch.setattr(ledger_module, "read_post_records", unread)
    posting = Ledger.load(state)  # what a pass does: load, post, save
    posting.record_posted(fake(4), "4.csv", "4", duplicate=True)
    posting.save(move_post_records=True)
    assert sidecar_path(state).stat().st_size == size  # not rewritten, not grown
    monkeypatch.undo()
    again = Ledger.load(state)
    assert again.apps[fake(2)] == {
        "esiid": "1",
        "id": "2",
        "path": "2.csv",
        "duplicate": False,
        "at": again.apps[fake(2)]["at"],
    }
    assert again.apps[fake(4)]["duplicate"] is True and len(again.apps) == 4


def test_a_torn_post_log_line_is_skipped_and_does_not_swallow_the_next(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    ledger = Ledger.load(state)
    ledger.record_posted(fake(1), "a.csv", "1", duplicate=False)
    with posts_path(state).open("ab") as log:  # killed mid-line
        log.write(b'{"sha256": "' + fake(2).encode() + b'", "id": "2", "pa')
    Ledger.load(state).record_posted(fake(3), "c.csv", "3", duplicate=False)
    assert set(read_post_records(state)) == {fake(1), fake(3)}
    # A later line for the same digest wins (a forgotten file posted again).
    Ledger.load(state).record_posted(fake(1), "a2.csv", "9", duplicate=False)
    assert read_post_records(state)[fake(1)]["id"] == "9"


def test_forget_takes_the_file_out_of_the_post_log(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    ledger = Ledger.load(state)
    ledger.record_posted(fake(1), "a.csv", "1", duplicate=False)
    ledger.record_posted(fake(2), "b.csv", "2", duplicate=False)
    posts_path(state).chmod(0o640)
    assert ledger.forget({fake(1)}) == 1
    ledger.save()
    assert set(read_post_records(state)) == {fake(2)}
    assert stat.S_IMODE(posts_path(state).stat().st_mode) == 0o640  # the rewrite keeps it
    assert set(Ledger.load(state).apps) == {fake(2)}


def test_a_post_log_that_cannot_be_written_loses_no_post_and_save_says_so(
    tmp_path: Path,
) -> None:
    """The post log is advisory: a failed append (here: a directory in its place) never stops
    recording the post in STATE_FILE; save() still writes the sidecar, then names the post log
    (a pass exits 1 on it), and a later save appends what is pending."""
    state = tmp_path / ".posted_sha256"
    posts_path(state).mkdir()
    ledger = Ledger.load(state)
    ledger.remember_digest("a.csv", 10, 123, fake(1))
    ledger.record_posted(fake(1), "a.csv", "1", duplicate=False)
    assert read_posted_digests(state) == {fake(1)}
    with pytest.raises(LedgerError, match="post log"):
        ledger.save()
    assert set(json.loads(sidecar_path(state).read_text())["hashes"]) == {"a.csv"}
    posts_path(state).rmdir()
    ledger.save()
    assert read_post_records(state)[fake(1)]["id"] == "1"


def test_an_old_sidecars_post_records_move_into_the_post_log(tmp_path: Path) -> None:
    """A sidecar written before the post log kept the records in its ``posted`` section: they
    stay readable, a reader's save keeps them, and the next pass (which holds the lock) moves
    them into the log; a record the log already has wins over the old one."""
    state = tmp_path / ".posted_sha256"
    state.write_text(f"{fake(1)}\n{fake(2)}\n")
    old = {"id": "1", "path": "a.csv", "duplicate": False, "at": 1.0, "esiid": "7"}
    sidecar_path(state).write_text(
        json.dumps(
            {
                "version": 1,
                "hashes": {"a.csv": [10, 123, fake(1)]},
                "outcomes": {},
                "posted": {fake(1): old, fake(2): {**old, "id": "2", "path": "b.csv"}},
            }
        )
    )
    posts_path(state).write_text(json.dumps({"sha256": fake(2), "id": "2-new"}) + "\n")
    reader = Ledger.load(state)
    assert reader.apps[fake(1)] == old and reader.apps[fake(2)]["id"] == "2-new"
    reader.remember_digest("b.csv", 10, 124, fake(2))
    reader.save()  # status's hash-cache save: the old records are kept where they were
    assert set(json.loads(sidecar_path(state).read_text())["posted"]) == {fake(1), fake(2)}

    passing = Ledger.load(state)
    passing.save(move_post_records=True)
    assert "posted" not in json.loads(sidecar_path(state).read_text())
    moved = read_post_records(state)
    assert moved[fake(1)] == old and moved[fake(2)] == {"id": "2-new"}
    assert Ledger.load(state).apps == moved


def test_corrupt_sidecar_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / ".posted_sha256"
    state.write_text(f"{fake(1)}\n")
    sidecar_path(state).write_text("{not json")
    ledger = Ledger.load(state)
    assert ledger.is_posted(fake(1)) and ledger.hashes == {}
    sidecar_path(state).write_text(json.dumps({"hashes": {"x": "bad"}, "outcomes": []}))
    assert Ledger.load(state).hashes == {}


# -- the lock ---------------------------------------------------------------------------------


def test_lock_is_beside_the_ledger(tmp_path: Path) -> None:
    assert lock_path_for(tmp_path / ".posted_sha256") == tmp_path / ".posted_sha256.lock"


def test_second_holder_waits_then_gives_up(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with PassLock(path, wait=0):
        began = time.monotonic()
        with pytest.raises(LockBusy, match=f"pid {os.getpid()}"):
            PassLock(path, wait=0.3, poll=0.05).acquire()
        assert 0.25 <= time.monotonic() - began < 2
    with PassLock(path, wait=0):  # released
        pass


def _hold_lock_in_child(path: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys,time; sys.path.insert(0, sys.argv[2]);"
        "from smt_droplet.lock import PassLock;"
        "l = PassLock(sys.argv[1], wait=0); l.acquire(); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(REPO / "src")], stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"held"
    return child


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    child = _hold_lock_in_child(path)
    try:
        with pytest.raises(LockBusy):
            PassLock(path, wait=0).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        with PassLock(path, wait=2):
            pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_waiting_holder_gets_the_lock_when_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    child = _hold_lock_in_child(path)
    try:
        began = time.monotonic()
        # release after ~0.3 s by terminating the holder
        import threading

        threading.Timer(0.3, child.terminate).start()
        with PassLock(path, wait=10, poll=0.02):
            waited = time.monotonic() - began
        assert 0.2 < waited < 5
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
