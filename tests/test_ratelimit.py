"""The persistent sliding-window limiter behind the upload server's 429s."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from smt_droplet.ratelimit import RateLimiter, RateLimitError


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_allows_up_to_the_limit_then_refuses(tmp_path: Path, clock: Clock) -> None:
    limiter = RateLimiter(tmp_path / "rl.db", clock=clock)
    remaining = []
    for _ in range(5):
        d = limiter.reserve("customer:home", 5, 100.0)
        assert d.allowed and d.reservation is not None
        remaining.append(d.remaining)
        clock.now += 1
    assert remaining == [4, 3, 2, 1, 0]
    d = limiter.reserve("customer:home", 5, 100.0)
    assert not d.allowed and d.remaining == 0 and d.reservation is None
    # The oldest counted upload (t0) leaves the window at t0 + 100; now is t0 + 5.
    assert d.reset_at == 1_800_000_100.0
    assert d.retry_after == 95
    assert limiter.count("customer:home", 100.0) == 5


def test_peek_counts_nothing(tmp_path: Path, clock: Clock) -> None:
    limiter = RateLimiter(tmp_path / "rl.db", clock=clock)
    assert limiter.peek("k", 1, 60).allowed
    assert limiter.peek("k", 1, 60).allowed
    limiter.reserve("k", 1, 60)
    clock.now += 10
    d = limiter.peek("k", 1, 60)
    assert not d.allowed and d.retry_after == 50
    assert limiter.count("k", 60) == 1


def test_window_slides(tmp_path: Path, clock: Clock) -> None:
    limiter = RateLimiter(tmp_path / "rl.db", clock=clock)
    assert limiter.reserve("k", 2, 10.0).allowed
    clock.now += 6
    assert limiter.reserve("k", 2, 10.0).allowed
    assert not limiter.reserve("k", 2, 10.0).allowed
    clock.now += 4.5  # the first one is now 10.5 s old
    d = limiter.reserve("k", 2, 10.0)
    assert d.allowed and d.remaining == 0
    assert not limiter.reserve("k", 2, 10.0).allowed


def test_keys_are_independent(tmp_path: Path, clock: Clock) -> None:
    limiter = RateLimiter(tmp_path / "rl.db", clock=clock)
    assert limiter.reserve("admin:a", 1, 60).allowed
    assert not limiter.reserve("admin:a", 1, 60).allowed
    assert limiter.reserve("admin:b", 1, 60).allowed
    assert limiter.reserve("customer:a", 1, 60).allowed


def test_release_gives_the_slot_back(tmp_path: Path, clock: Clock) -> None:
    limiter = RateLimiter(tmp_path / "rl.db", clock=clock)
    d = limiter.reserve("k", 1, 60)
    assert not limiter.reserve("k", 1, 60).allowed
    limiter.release(d.reservation)
    assert limiter.reserve("k", 1, 60).allowed
    limiter.release(None)  # no-op


def test_state_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "state" / "rl.db"
    first = RateLimiter(path, clock=clock)
    for _ in range(3):
        assert first.reserve("admin:x", 3, 86400).allowed
    first.close()
    second = RateLimiter(path, clock=clock)
    d = second.reserve("admin:x", 3, 86400)
    assert not d.allowed
    assert d.retry_after == 86400
    second.close()


def test_two_limiters_on_one_file_do_not_overshoot(tmp_path: Path, clock: Clock) -> None:
    a = RateLimiter(tmp_path / "rl.db", clock=clock)
    b = RateLimiter(tmp_path / "rl.db", clock=clock)
    allowed = sum((a if i % 2 else b).reserve("k", 7, 60).allowed for i in range(20))
    assert allowed == 7


def test_database_file_is_group_writable(tmp_path: Path) -> None:
    path = tmp_path / "rl.db"
    old = os.umask(0o007)  # what the service's UMask= sets
    try:
        RateLimiter(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RateLimitError, match="limiter database"):
        RateLimiter(blocker / "rl.db")


def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rl.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(RateLimitError):
        RateLimiter(path)
    assert sqlite3.sqlite_version  # the stdlib module is what the droplet uses
