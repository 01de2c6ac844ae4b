"""The small SQLite files the servers keep (upload limiter, stored uploads, webhook replay
memory): one way to open them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_state_db(path: Path, mode: int, schema: str) -> sqlite3.Connection:
    """Open (creating it with ``mode`` first: SQLite itself would use 0644) a WAL-mode database
    in autocommit and apply ``schema``. Raises ``OSError`` or ``sqlite3.Error``; callers name
    their own error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    os.close(fd)
    db = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db
