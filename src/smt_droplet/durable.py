"""The one way this package puts a file into place durably.

Every writer that must never leave a half-written file under its final name (the spool, the
ledger's rewrite and sidecar, the SFTP mirror, the upload server) goes through here::

    temp file in the destination directory (O_EXCL) → write all → fsync → (mtime, owner) →
    rename over the final name → fsync the directory

Any failure — a full disk (``ENOSPC`` on write or fsync) included — removes the temp file and
leaves the final name as it was. A short ``write`` is continued, never renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a short write is continued)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = ".tmp", tmp_dir: Path | None = None) -> Path:
    """A fresh hidden name beside ``path`` (or in ``tmp_dir``, on the same filesystem)."""
    return (tmp_dir or path.parent) / f".{path.name}.{uuid.uuid4().hex}{suffix}"


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def place(tmp: Path, path: Path, *, mtime: float | None = None, sync_dir: bool = True) -> None:
    """Rename a complete, fsynced ``tmp`` over ``path`` (giving it ``mtime`` first)."""
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o660,
    tmp_dir: Path | None = None,
    suffix: str = ".tmp",
    mtime: float | None = None,
    owner: tuple[int, int] | None = None,
    sync_dir: bool = True,
) -> None:
    """Put ``data`` at ``path`` by the sequence in the module docstring.

    ``owner`` (uid, gid) is applied when allowed (``forget`` run as root on a file the service
    owns keeps the service's owner); ``sync_dir=False`` leaves the directory fsync to the caller
    (the mirror writes thousands of small files in one directory).
    """
    path = Path(path)
    tmp = temp_path(path, suffix, tmp_dir)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
            if owner is not None:
                with contextlib.suppress(OSError):
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        place(tmp, path, mtime=mtime, sync_dir=False)
    except BaseException:
        remove_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: dict[str, Any], tmp_dir: Path | None = None) -> None:
    """``payload`` as sorted JSON, written with :func:`write_atomic`."""
    write_atomic(Path(path), json.dumps(payload, sort_keys=True).encode(), tmp_dir=tmp_dir)
