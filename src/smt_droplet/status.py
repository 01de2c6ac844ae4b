"""Per-file state of the inbox (``smt-droplet status``): built from the ledger, rendered as
text or JSON by the caller."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from . import spool
from .config import InboxSettings
from .inbox import scan_inbox
from .ledger import Ledger, LedgerError
from .lock import lock_path_for
from .process import file_digest

log = logging.getLogger("smt_droplet.status")


@dataclass
class FileStatus:
    """One row of ``smt-droplet status``."""

    path: str
    state: str  # posted | rejected | too-large | failed-will-retry (PGP only) | pending
    sha256: str
    size: int
    reason: str = ""
    app_id: str | None = None
    via: str | None = None  # "pgp" for a PGP delivery the pass has handled
    member: str | None = None  # its zip entry that was posted (or rejected by the app)
    csv_sha256: str | None = None  # that entry's digest


def status_report(settings: InboxSettings) -> dict[str, Any]:
    """Everything ``status`` shows: the files, the queue and the last pass's result."""
    report = inbox_status(settings)
    report["queued_requests"] = spool.depth(settings.spool_dir)
    report["last_ingest"] = spool.read_last_result(settings.spool_dir)
    return report


def inbox_status(settings: InboxSettings) -> dict[str, Any]:
    """Per-file state from the ledger and the inbox (hashes cached like a pass does)."""
    ledger = Ledger.load(settings.state_file)
    exclude = [settings.state_file, ledger.sidecar, lock_path_for(settings.state_file)]
    rows: list[FileStatus] = []
    for item in scan_inbox(settings.local_dir, settings.include, exclude):
        digest = ledger.cached_digest(item.rel, item.size, item.mtime_ns)
        if digest is None:
            try:
                digest, _ = file_digest(ledger, item)
            except OSError:
                continue
        rows.append(_row(ledger, item.rel, digest, item.size))
    try:
        ledger.save()
    except LedgerError as exc:
        log.debug("hash cache not saved: %s", exc)
    seen = {r.sha256 for r in rows}
    return {
        "inbox": str(settings.local_dir),
        "state_file": str(settings.state_file),
        "ledger_entries": len(ledger.posted),
        "ledger_entries_not_in_inbox": len(ledger.posted - seen),
        "counts": dict(Counter(r.state for r in rows)),
        "files": [asdict(r) for r in rows],
    }


def _row(ledger: Ledger, rel: str, digest: str, size: int) -> FileStatus:
    app = ledger.apps.get(digest) or {}
    previous = ledger.outcome(digest)
    if ledger.is_posted(digest):
        state, reason, info = "posted", "", app
    elif previous is not None:
        state, reason = str(previous.status), previous.reason
        info = ledger.outcomes.get(digest) or {}
    else:
        state, reason, info = "pending", "", {}
    row = FileStatus(rel, state, digest, size, reason, app.get("id"))
    if info.get("via") == "pgp":
        row.via = "pgp"
        row.member = _str_or_none(info.get("member"))
        row.csv_sha256 = _str_or_none(info.get("csv_sha256"))
    return row


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def format_report(report: dict[str, Any]) -> list[str]:
    """The text form: one line per file, then one line of totals."""
    lines = []
    for row in report["files"]:
        extra = f" {row['reason']}" if row["reason"] else ""
        app = f" id={row['app_id']}" if row["app_id"] else ""
        if row["member"]:
            extra += f" pgp-member={row['member']}"
        lines.append(f"{row['state']:<10} {row['path']} sha256={row['sha256'][:12]}{app}{extra}")
    counts = " ".join(f"{k}={v}" for k, v in sorted(report["counts"].items()))
    lines.append(
        f"ledger={report['ledger_entries']} (not in inbox: "
        f"{report['ledger_entries_not_in_inbox']}) {counts} queued={report['queued_requests']}"
    )
    return lines
