"""What counts as an inbox file: name patterns and the depth-2 walk.

The SFTP mirror and the ingest pass agree through this module on which names are candidates:
a base name matching one of ``SMT_INCLUDE`` (case-insensitive globs; defaults ``*.csv``,
``*.csv.*``, ``*DailyMeterUsage*.asc``, ``*IntervalMeterUsage*.asc``), never a dot file (the
ledger, its sidecar, the lock and in-flight ``.*.partial`` downloads are all dot files) and never
``*.partial``. Files count in the inbox itself and one level of sub-directories (depth 2), whatever
brought them there (SFTP mirror or upload server). Stdlib only: importable without paramiko.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 2


@dataclass
class InboxFile:
    """A candidate file: ``rel`` is its path relative to the inbox (POSIX separators)."""

    rel: str
    path: Path
    size: int
    mtime: float
    mtime_ns: int


def matches(name: str, include: tuple[str, ...]) -> bool:
    """Case-insensitive glob match of a base name; dot files and ``.partial`` never match."""
    if name.startswith(".") or name.endswith(".partial"):
        return False
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, pattern.lower()) for pattern in include)


def scan_inbox(
    local_dir: Path,
    include: tuple[str, ...],
    exclude: Iterable[Path] = (),
    max_depth: int = MAX_DEPTH,
) -> list[InboxFile]:
    """Every matching regular file in the inbox and its sub-directories down to ``max_depth``.

    One ``scandir`` per directory and one ``stat`` per file: cheap enough for 10,000 files.
    """
    skip = {os.path.abspath(p) for p in exclude}
    found: list[InboxFile] = []
    pending: list[tuple[Path, str, int]] = [(Path(local_dir), "", 1)]
    while pending:
        directory, prefix, depth = pending.pop(0)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if depth < max_depth:
                    pending.append((Path(entry.path), rel + "/", depth + 1))
                continue
            if not entry.is_file(follow_symlinks=False) or not matches(entry.name, include):
                continue
            if skip and os.path.abspath(entry.path) in skip:
                continue
            st = entry.stat(follow_symlinks=False)
            found.append(InboxFile(rel, Path(entry.path), st.st_size, st.st_mtime, st.st_mtime_ns))
    return found


def inbox_file(path: Path, local_dir: Path) -> InboxFile:
    """An :class:`InboxFile` for one given path (``post PATH``, the module's ``paths``)."""
    path = Path(path)
    st = path.stat()
    try:
        rel = path.resolve().relative_to(Path(local_dir).resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    return InboxFile(rel, path, st.st_size, st.st_mtime, st.st_mtime_ns)
