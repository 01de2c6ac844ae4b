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
import functools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 2


@dataclass(slots=True)
class InboxFile:
    """A candidate file: ``rel`` is its path relative to the inbox (POSIX separators),
    ``location`` the path to open. Slotted, and the ``Path`` made only when asked for: a pass
    scans every file of the inbox (100,000 after years) and opens only the new ones."""

    rel: str
    location: str
    size: int
    mtime: float
    mtime_ns: int

    @property
    def path(self) -> Path:
        return Path(self.location)


def matches(name: str, include: tuple[str, ...]) -> bool:
    """Case-insensitive glob match of a base name; dot files and ``.partial`` never match."""
    if name.startswith(".") or name.endswith(".partial"):
        return False
    return _pattern(include)(name) is not None


@functools.lru_cache(maxsize=16)
def _pattern(include: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """The globs as one case-insensitive regex (``fnmatch.translate``), compiled once."""
    joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in include) or r"(?!)"
    return re.compile(joined, re.IGNORECASE | re.DOTALL).match


def scan_inbox(
    local_dir: Path,
    include: tuple[str, ...],
    exclude: Iterable[Path] = (),
    max_depth: int = MAX_DEPTH,
) -> list[InboxFile]:
    """Every matching regular file in the inbox and its sub-directories down to ``max_depth``.

    One ``scandir`` per directory and one ``stat`` per file, no ``Path`` per file.
    """
    skip = {os.path.abspath(p) for p in exclude}
    skip_names = {os.path.basename(p) for p in skip}  # abspath only for a name that may match
    found: list[InboxFile] = []
    pending: list[tuple[Path, str, int]] = [(Path(local_dir), "", 1)]
    while pending:
        directory, prefix, depth = pending.pop(0)
        files: list[InboxFile] = []
        subdirs: list[tuple[Path, str, int]] = []
        try:
            with os.scandir(directory) as listing:  # streamed: no DirEntry list held
                for entry in listing:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    rel = prefix + name if prefix else name
                    if entry.is_dir(follow_symlinks=False):
                        if depth < max_depth:
                            subdirs.append((Path(entry.path), rel + "/", depth + 1))
                        continue
                    if not entry.is_file(follow_symlinks=False) or not matches(name, include):
                        continue
                    if name in skip_names and os.path.abspath(entry.path) in skip:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    files.append(
                        InboxFile(rel, entry.path, st.st_size, st.st_mtime, st.st_mtime_ns)
                    )
        except (FileNotFoundError, NotADirectoryError):
            continue
        files.sort(key=lambda f: f.rel)
        found.extend(files)
        pending.extend(sorted(subdirs, key=lambda d: d[1][:-1]))  # by name
    return found


def inbox_file(path: Path, local_dir: Path) -> InboxFile:
    """An :class:`InboxFile` for one given path (``post PATH``, the module's ``paths``)."""
    path = Path(path)
    st = path.stat()
    try:
        rel = path.resolve().relative_to(Path(local_dir).resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    return InboxFile(rel, str(path), st.st_size, st.st_mtime, st.st_mtime_ns)
