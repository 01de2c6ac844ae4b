"""Leftovers swept at the start of a pass (under the pass lock), once older than an hour:

* ``<spool>/tmp/*`` — a request a writer was killed before it renamed into ``queue/``;
* ``<inbox>/.upload-*.part`` — an upload the server was killed in the middle of (the server
  removes its own at start and after each request; an upload may take at most
  ``SMT_UPLOAD_BODY_TIMEOUT``, 10 minutes by default, so an hour-old one is dead);
* ``<inbox>/pgp_tmp.*`` directories — the seed droplet's decryption scratch space (it held
  plaintext, and its CSVs would otherwise be picked up as inbox files).

Each removal is one INFO line; nothing else in the inbox is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from . import filenames

log = logging.getLogger("smt_droplet.ingest")

STALE_AFTER = 3600.0
SEED_PGP_PREFIX = "pgp_tmp."


def _old(entry: os.DirEntry[str], cutoff: float) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_mtime < cutoff
    except FileNotFoundError:
        return False


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def sweep_stale(
    inbox: Path,
    spool_dir: Path | None,
    *,
    older_than: float = STALE_AFTER,
    now: float | None = None,
) -> list[str]:
    """Remove what the module docstring lists; returns the paths removed."""
    cutoff = (time.time() if now is None else now) - older_than
    removed: list[str] = []

    def unlink(path: str, what: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot sweep %s: %s", path, exc.strerror or exc)
            return
        gone(path, what)

    def gone(path: str, what: str) -> None:
        removed.append(path)
        log.info("swept %s %s (older than %d min)", what, path, older_than // 60)

    if spool_dir is not None:
        for entry in _entries(spool_dir / "tmp"):
            if entry.is_file(follow_symlinks=False) and _old(entry, cutoff):
                unlink(entry.path, "an unfinished spool request")
    for entry in _entries(inbox):  # the name first: an inbox holds years of CSVs
        if filenames.is_temp_name(entry.name):
            if entry.is_file(follow_symlinks=False) and _old(entry, cutoff):
                unlink(entry.path, "a dead upload's partial file")
        elif (
            entry.name.startswith(SEED_PGP_PREFIX)
            and entry.is_dir(follow_symlinks=False)
            and _old(entry, cutoff)
        ):
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                log.warning("cannot sweep %s: %s", entry.path, exc.strerror or exc)
                continue
            gone(entry.path, "the seed's PGP scratch directory")
    return removed
