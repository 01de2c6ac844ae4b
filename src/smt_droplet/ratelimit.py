"""Sliding-window upload limits that survive a restart (one small SQLite file).

Each accepted upload is one row ``(key, ts)``. A request may go ahead when fewer than ``limit``
rows for its key fall inside the last ``window`` seconds. The upload server *reserves* a slot
before it reads the body (so concurrent uploads cannot overshoot the limit) and *releases* it
when the upload is rejected after all (too large, not a CSV, cut off), so only uploads that were
received count. The seed deployment kept these counters in memory and lost them on every restart.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .statedb import open_state_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_key_ts ON uploads (key, ts);
"""


class RateLimitError(OSError):
    """The limiter's database cannot be opened or written."""


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`RateLimiter.reserve`."""

    allowed: bool
    key: str
    limit: int
    remaining: int
    reset_at: float  # epoch seconds when the oldest counted upload leaves the window
    retry_after: int  # seconds; 0 when allowed
    reservation: int | None = None  # row id to release if the upload fails


class RateLimiter:
    """A persistent sliding-window counter per key. Not thread-safe; one per event loop."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        try:
            self._db = open_state_db(path, 0o660, _SCHEMA)
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise RateLimitError(f"cannot open the upload limiter database {path}: {exc}") from exc

    def usable(self) -> bool:
        """Whether the database answers a query (a corrupt or vanished file does not)."""
        try:
            self._db.execute("SELECT id FROM uploads LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def reserve(self, key: str, limit: int, window: float) -> Decision:
        """Count one upload for ``key`` if it is under ``limit`` in the last ``window`` s."""
        now = self._clock()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "DELETE FROM uploads WHERE key = ? AND ts <= ?", (key, now - window)
                )
                count, oldest = self._db.execute(
                    "SELECT COUNT(*), MIN(ts) FROM uploads WHERE key = ?", (key,)
                ).fetchone()
                if count >= limit:
                    self._db.execute("COMMIT")
                    reset_at = (oldest if oldest is not None else now) + window
                    return Decision(
                        allowed=False,
                        key=key,
                        limit=limit,
                        remaining=0,
                        reset_at=reset_at,
                        retry_after=max(1, int(reset_at - now + 0.999)),
                    )
                cursor = self._db.execute("INSERT INTO uploads (key, ts) VALUES (?, ?)", (key, now))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise RateLimitError(f"upload limiter database {self.path}: {exc}") from exc
        return Decision(
            allowed=True,
            key=key,
            limit=limit,
            remaining=max(0, limit - count - 1),
            reset_at=(oldest if oldest is not None else now) + window,
            retry_after=0,
            reservation=cursor.lastrowid,
        )

    def peek(self, key: str, limit: int, window: float) -> Decision:
        """Would :meth:`reserve` allow ``key`` now? Counts nothing."""
        now = self._clock()
        try:
            count, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(ts) FROM uploads WHERE key = ? AND ts > ?",
                (key, now - window),
            ).fetchone()
        except sqlite3.Error as exc:
            raise RateLimitError(f"upload limiter database {self.path}: {exc}") from exc
        reset_at = (oldest if oldest is not None else now) + window
        allowed = count < limit
        return Decision(
            allowed=allowed,
            key=key,
            limit=limit,
            remaining=max(0, limit - count),
            reset_at=reset_at,
            retry_after=0 if allowed else max(1, int(reset_at - now + 0.999)),
        )

    def release(self, reservation: int | None) -> None:
        """Give back a slot reserved for an upload that was not accepted after all."""
        if reservation is None:
            return
        try:
            self._db.execute("DELETE FROM uploads WHERE id = ?", (reservation,))
        except sqlite3.Error as exc:
            raise RateLimitError(f"upload limiter database {self.path}: {exc}") from exc

    def count(self, key: str, window: float) -> int:
        """Uploads counted for ``key`` in the last ``window`` seconds."""
        (n,) = self._db.execute(
            "SELECT COUNT(*) FROM uploads WHERE key = ? AND ts > ?", (key, self._clock() - window)
        ).fetchone()
        return int(n)
