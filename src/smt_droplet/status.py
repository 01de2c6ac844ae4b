"""Per-file state of the inbox (``smt-droplet status``): built from the ledger, rendered as
text or JSON by the caller."""

from __future__ import annotations

import logging
import re
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from . import spool
from .config import InboxSettings
from .csvdata import brief
from .filenames import is_upload_name
from .inbox import scan_inbox
from .landing import NOT_LANDED
from .landing import brief as landing_brief
from .ledger import Ledger, LedgerError
from .logsafety import visible
from .outcomes import NEEDS_OPERATOR, Outcome, iso_utc
from .process import file_digest

log = logging.getLogger("smt_droplet.status")
FAILED = str(Outcome.FAILED)


@dataclass
class FileStatus:
    """One row of ``smt-droplet status``."""

    path: str
    # posted | rejected | too-large | not-csv | no-esiid | ignored | failed-will-retry | pending
    state: str
    sha256: str
    size: int
    reason: str = ""
    app_id: str | None = None
    via: str | None = None  # "pgp" for a PGP delivery the pass has handled
    member: str | None = None  # its zip entry that was posted (or rejected by the app)
    csv_sha256: str | None = None  # that entry's digest
    arrived: str | None = None  # first seen in the inbox (else the file's mtime), UTC ISO
    at: str | None = None  # when the state was reached, UTC ISO
    esiid: str | None = None
    meter: str | None = None
    needs_operator: bool = False
    summary: dict[str, Any] | None = None  # csvdata.DataSummary.to_dict() of the posted CSV
    source: str = "sftp"  # "upload" for a name the upload server gave (filenames.is_upload_name)
    landing: dict[str, Any] | None = None  # posted: landing.Landing.to_dict(), what the app kept
    attempts: int | None = None  # failed-will-retry: tries the last pass made
    next_try: str | None = None  # failed-will-retry: when the next pass starts (UTC ISO), if known


def status_report(settings: InboxSettings) -> dict[str, Any]:
    """Everything ``status`` shows: the files, the queue and the last pass's result."""
    report = inbox_status(settings, next_pass=next_timer_run())
    report["queued_requests"] = spool.depth(settings.spool_dir)
    report["last_ingest"] = spool.read_last_result(settings.spool_dir)
    return report


def landing_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Posted files by landing verdict (``no-verdict``: posted before verdicts were kept)."""
    return dict(
        Counter(
            str((r.get("landing") or {}).get("verdict") or "no-verdict")
            for r in rows
            if r["state"] == "posted"
        )
    )


def inbox_status(
    settings: InboxSettings, *, save_cache: bool = True, next_pass: str | None = None
) -> dict[str, Any]:
    """Per-file state from the ledger and the inbox (hashes cached like a pass does; a reader
    that does not own the ledger, the operator page's server, passes ``save_cache=False``).
    ``next_pass``: when the timer starts the next pass, the next try of a failed file."""
    ledger = Ledger.load(settings.state_file)
    exclude = ledger.own_files
    rows: list[FileStatus] = []
    for item in scan_inbox(settings.local_dir, settings.include, exclude):
        digest = ledger.cached_digest(item.rel, item.size, item.mtime_ns)
        if digest is None:
            try:
                digest, _ = file_digest(ledger, item)
            except OSError:
                continue
        row = _row(ledger, item.rel, digest, item.size)
        row.arrived = iso_utc(ledger.first_seen(item.rel) or item.mtime)
        if row.state == FAILED:
            row.next_try = next_pass
        rows.append(row)
    if save_cache:
        try:
            ledger.save()
        except LedgerError as exc:
            log.debug("hash cache not saved: %s", exc)
    seen = {r.sha256 for r in rows}
    rows.sort(key=lambda r: (not r.needs_operator, r.path))
    files = [asdict(r) for r in rows]
    return {
        "inbox": str(settings.local_dir),
        "state_file": str(settings.state_file),
        "ledger_entries": len(ledger.posted),
        "ledger_entries_not_in_inbox": len(ledger.posted - seen),
        "counts": dict(Counter(r.state for r in rows)),
        "needs_operator": sum(r.needs_operator for r in rows),
        "waiting_for_app": sum(r.state == "waiting-for-app" for r in rows),
        "files": files,
        "landing": landing_counts(files),
    }


def file_status(
    settings: InboxSettings, digest: str, rel: str | None = None, next_pass: str | None = None
) -> dict[str, Any]:
    """The row of one file by its digest (``rel``: where it was stored, when the ledger has not
    seen it yet), without scanning the inbox; raises KeyError when neither knows it."""
    ledger = Ledger.load(settings.state_file)
    recorded = ledger.apps.get(digest) or ledger.outcomes.get(digest) or {}
    rel = ledger.path_of(digest) or rel or _str_or_none(recorded.get("path"))
    if rel is None:
        raise KeyError(digest)
    try:
        stat = (settings.local_dir / rel).stat()
        size, mtime = stat.st_size, stat.st_mtime
    except OSError:  # posted and gone (retention), or a bad hint
        if not ledger.is_posted(digest) and ledger.outcome(digest) is None:
            raise KeyError(digest) from None
        size, mtime = 0, None
    row = _row(ledger, rel, digest, size)
    if row.state == FAILED:
        row.next_try = next_pass
    first = ledger.first_seen(rel) or mtime
    row.arrived = iso_utc(first) if first is not None else None
    return asdict(row)


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
    row.needs_operator = state in NEEDS_OPERATOR
    row.source = "upload" if is_upload_name(rel) else "sftp"
    row.at = iso_utc(info["at"]) if isinstance(info.get("at"), int | float) else None
    row.esiid = _str_or_none(info.get("esiid"))
    row.meter = _str_or_none(info.get("meter"))
    if state == FAILED and isinstance(info.get("attempts"), int):
        row.attempts = info["attempts"]
    row.summary = info.get("summary") if isinstance(info.get("summary"), dict) else None
    if state == "posted":
        row.landing = info.get("landing") if isinstance(info.get("landing"), dict) else None
    if info.get("via") == "pgp":
        row.via = "pgp"
        row.member = _str_or_none(info.get("member"))
        row.csv_sha256 = _str_or_none(info.get("csv_sha256"))
    return row


_SYSTEMD_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) UTC\Z")


def next_timer_run(unit: str = "smt-ingest.timer") -> str | None:
    """When systemd starts the timer's next pass (UTC ISO), or None off systemd.

    ``systemctl show -P`` prints the time in the caller's zone (systemd 252 ignores
    ``--timestamp=unix`` there): it runs with ``TZ=UTC`` and its answer is parsed as such."""
    try:
        out = subprocess.run(
            ["systemctl", "show", "-P", "NextElapseUSecRealtime", unit],
            capture_output=True,
            text=True,
            timeout=3,
            check=False,
            env={"TZ": "UTC", "PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    found = _SYSTEMD_TIME.search(out)
    return f"{found.group(1)}T{found.group(2)}Z" if found else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def format_report(report: dict[str, Any]) -> list[str]:
    """The text form: one line per file (those that need an operator first, their reason on
    the line), then one line of totals; control characters (a file name's, an app's message's)
    are shown escaped."""
    lines = []
    for row in report["files"]:
        parts = [f"{row['state']:<17}", row["path"], f"sha256={row['sha256'][:12]}"]
        parts.append(f"arrived={row['arrived'] or '-'}")
        if row["at"]:
            parts.append(f"at={row['at']}")
        parts.append(f"esiid={row['esiid'] or '-'} meter={row['meter'] or '-'}")
        if row["app_id"]:
            parts.append(f"id={row['app_id']}")
        if row["member"]:
            parts.append(f"pgp-member={row['member']}")
        if row.get("landing"):
            parts.append(landing_brief(row["landing"]))
        if row["summary"]:
            parts.append(brief(row["summary"]))
        if (row.get("landing") or {}).get("verdict") in NOT_LANDED:
            parts.append(f"landing: {row['landing'].get('detail')}")
        if row["reason"]:
            parts.append(f"reason: {row['reason']}")
        if row["state"] == FAILED:
            parts.append(f"next-try={row.get('next_try') or 'the next pass'}")
        lines.append(visible(" ".join(parts), newlines=False))
    counts = " ".join(f"{k}={v}" for k, v in sorted(report["counts"].items()))
    landed = " ".join(f"{k}={v}" for k, v in sorted(report.get("landing", {}).items()))
    lines.append(
        f"ledger={report['ledger_entries']} (not in inbox: "
        f"{report['ledger_entries_not_in_inbox']}) {counts} "
        f"needs-operator={report['needs_operator']} queued={report['queued_requests']}"
        + (f" landed: {landed}" if landed else "")
    )
    return lines
