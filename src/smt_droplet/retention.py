"""The disk over years: retention of posted files and dated copies of the ledger.

Run by a pass after its posts are recorded (:func:`run_housekeeping`, under the pass lock).

* **Retention** (``SMT_RETENTION_DAYS`` > 0): an inbox file whose bytes the app accepted
  (the ledger lists its sha256) more than that many days ago leaves the inbox — gzipped into
  ``SMT_ARCHIVE_DIR/YYYY-MM/<path>.gz`` (``SMT_RETENTION_MODE=archive``, the default; the month
  of the post) or deleted (``delete``). The ledger's ``retired`` section remembers path, size,
  mtime and digest, so the mirror does not download the same remote file again; a re-delivery
  (new mtime, or another name) is downloaded, hashed, and skipped as already posted. Files that
  were never posted — no ESIID, rejected, ignored, waiting for a retry — are never removed.
  Each removal is one INFO line.
* **Ledger copies** (``SMT_LEDGER_COPIES`` = N > 0): once a day the ledger and its sidecar are
  copied to ``<ledger dir>/.ledger-copies/<name>.YYYY-MM-DD`` and only the N newest days stay.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import durable
from .config import LifecycleSettings
from .ledger import POSTS_SUFFIX, SIDECAR_SUFFIX, Ledger, LedgerError

log = logging.getLogger("smt_droplet.ingest")

# What a daily ledger copy holds: STATE_FILE, its sidecar and its post log.
COPIED_SUFFIXES = ("", SIDECAR_SUFFIX, POSTS_SUFFIX)

COPIES_DIR = ".ledger-copies"
DAY = 86400.0


@dataclass
class HousekeepingResult:
    retired: list[str] = field(default_factory=list)
    retired_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    ledger_copy: Path | None = None


def run_housekeeping(
    settings: LifecycleSettings, *, listed: set[str] | None = None, now: float | None = None
) -> HousekeepingResult:
    """Retention, pruning of retired paths SFTP no longer lists (``listed``: a complete
    listing's paths), and the ledger's dated copy. Errors are logged and returned, never raised:
    housekeeping must not fail the pass whose posts are already recorded."""
    now = time.time() if now is None else now
    result = HousekeepingResult()
    if settings.retention_days <= 0 and not settings.ledger_copies and listed is None:
        return result
    ledger = Ledger.load(settings.state_file)
    if settings.retention_days > 0:
        _retire_old(settings, ledger, now, result)
    if listed is not None and ledger.retired:
        pruned = ledger.prune_retired(listed)
        if pruned:
            log.info("retention: %d retired path(s) are no longer on SFTP; forgotten", pruned)
    try:
        ledger.save()
    except LedgerError as exc:
        result.errors.append(str(exc))
        log.error("retention: %s", exc)
    if settings.ledger_copies:
        result.ledger_copy = _copy_ledger(settings, now, result)
    return result


# -- retention --------------------------------------------------------------------------------


def _retire_old(
    settings: LifecycleSettings, ledger: Ledger, now: float, result: HousekeepingResult
) -> None:
    cutoff = now - settings.retention_days * DAY
    for rel, entry in sorted(ledger.hashes.items()):
        size, mtime_ns, digest = int(entry[0]), int(entry[1]), str(entry[2])
        if digest not in ledger.posted:
            continue  # never posted: needs a person, or waits for a retry
        posted_at = _posted_at(ledger, digest, mtime_ns)
        if posted_at > cutoff:
            continue
        path = settings.local_dir.joinpath(*rel.split("/"))
        try:
            st = path.stat()
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                continue  # changed since it was hashed: the next pass looks at it first
            archive = _archive(settings, path, rel, posted_at, st) if settings.archive_dir else None
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            message = f"cannot retire {rel}: {exc.strerror or exc}"
            result.errors.append(message)
            log.error("retention: %s; it stays in the inbox", message)
            continue
        ledger.retire(
            rel, size, mtime_ns // 1_000_000_000, digest, str(archive) if archive else None
        )
        del ledger.hashes[rel]
        result.retired.append(rel)
        result.retired_bytes += size
        where = f"archived to {archive}" if archive else "deleted"
        age = (now - posted_at) / DAY
        log.info("retired %s sha256=%s posted %.0f days ago: %s", rel, digest, age, where)


def _posted_at(ledger: Ledger, digest: str, mtime_ns: int) -> float:
    """When the app accepted ``digest`` (the sidecar), else the file's mtime (a seed ledger)."""
    at = (ledger.apps.get(digest) or {}).get("at")
    return float(at) if isinstance(at, int | float) else mtime_ns / 1e9


def _archive(
    settings: LifecycleSettings, path: Path, rel: str, posted_at: float, st: os.stat_result
) -> Path:
    """``path`` gzipped under the archive's month directory (fsynced before the caller unlinks
    the original); a name taken by an earlier copy gets the digest's start appended."""
    assert settings.archive_dir is not None
    month = time.strftime("%Y-%m", time.gmtime(posted_at))
    target = settings.archive_dir / month / (rel + ".gz")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{path.name}.{int(st.st_mtime_ns)}.gz")
    tmp = durable.temp_path(target)
    try:
        with path.open("rb") as src, open(tmp, "wb") as raw:
            with gzip.GzipFile(
                filename=path.name, mode="wb", fileobj=raw, mtime=int(st.st_mtime)
            ) as gz:
                shutil.copyfileobj(src, gz, 1024 * 1024)
            raw.flush()
            os.fsync(raw.fileno())
        durable.place(tmp, target, mtime=st.st_mtime)
    except BaseException:
        durable.remove_quietly(tmp)
        raise
    return target


# -- ledger copies ----------------------------------------------------------------------------


def _copy_ledger(
    settings: LifecycleSettings, now: float, result: HousekeepingResult
) -> Path | None:
    ledger = settings.state_file
    if not ledger.exists():
        return None
    copies = ledger.parent / COPIES_DIR
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    target = copies / f"{ledger.name}.{day}"
    if target.exists():
        return target
    try:
        copies.mkdir(mode=0o750, exist_ok=True)
        for source in (ledger.with_name(ledger.name + s) for s in COPIED_SUFFIXES):
            if source.exists():
                durable.write_atomic(
                    copies / f"{source.name}.{day}", source.read_bytes(), mode=0o640
                )
        _drop_old_copies(copies, ledger.name, settings.ledger_copies)
    except OSError as exc:
        message = f"cannot copy the ledger to {copies}: {exc.strerror or exc}"
        result.errors.append(message)
        log.error("ledger copy: %s", message)
        return None
    log.info("ledger copied to %s", target)
    return target


def _drop_old_copies(copies: Path, name: str, keep: int) -> None:
    days = sorted(
        {p.name.rsplit(".", 1)[1] for p in copies.glob(f"{name}.????-??-??")}, reverse=True
    )
    for day in days[keep:]:
        for stale in (copies / f"{name}{suffix}.{day}" for suffix in COPIED_SUFFIXES):
            if stale.exists():
                durable.remove_quietly(stale)
                log.info("ledger copy %s dropped (SMT_LEDGER_COPIES=%d)", stale, keep)
