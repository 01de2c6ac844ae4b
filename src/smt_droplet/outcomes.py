"""The words a pass uses: per-file outcomes, exit codes, and the results that carry them.

One vocabulary for the whole package: the same :class:`Outcome` values appear in the journal's
per-file lines, in the modules' ``results``, in ``smt-droplet status`` and in the web app
answers' classification (:mod:`smt_droplet.inline_post`).

Exit codes (every command; systemd shows anything but 0 as a failed run):

* 0 — every file posted, deliberately skipped (already posted, ignored) or set aside for an
  operator (see below), or another pass holds the lock;
* 1 — something is left to retry (a POST failed after its retries, the SFTP sync failed, the
  ledger could not be written): the timer's next pass tries again;
* 2 — configuration error (missing/malformed setting, unreadable key, unknown/changed host key,
  401/503 from the app).

Files **waiting for the app** (:data:`WAITING_OUTCOMES`: the app answered
``HOME_ID_REQUIRED``, it has no house for the ESIID yet) do not fail the pass either: they are
retried every ``SMT_WAITING_RETRY_SECONDS`` (6 h) until the app knows the customer.

Files that **need an operator** (:data:`NEEDS_OPERATOR`: no ESIID, rejected by the app, too
large, not a CSV, an undecryptable PGP delivery) do not fail the pass: retrying cannot fix them.
They are logged as a warning the first time a pass meets them, counted in every summary line,
``status``, the metrics and the alerts, and stay there until the operator settles them
(``smt-droplet post FILE --esiid E``, ``forget`` after fixing the cause, or ``ignore``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from typing import Any


def iso_utc(ts: float | None = None) -> str:
    """``ts`` (default: now) as UTC ISO 8601 to the second, ``2026-12-02T10:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class ExitCode(IntEnum):
    OK = 0
    RETRY = 1
    CONFIG = 2


class Outcome(StrEnum):
    """What happened to one file (the value is the word in logs and results)."""

    POSTED = "posted"
    DUPLICATE = "duplicate"  # the app already had these bytes: recorded like a post
    SKIPPED_POSTED = "skipped-already-posted"
    SKIPPED_REJECTED = "skipped-rejected"
    SKIPPED_TOO_LARGE = "skipped-too-large"
    REJECTED = "rejected"  # a 4xx from the app (or an undecryptable PGP delivery)
    TOO_LARGE = "too-large"  # the encoded body is over SMT_MAX_BODY_BYTES; never sent
    FAILED = "failed-will-retry"  # 5xx, timeout, connection error, 429 after the retries
    NO_ESIID = "no-esiid"
    NOT_CSV = "not-csv"  # empty, binary, markup: never posted
    SKIPPED_NOT_CSV = "skipped-not-csv"
    IGNORED = "ignored"  # the operator settled it with `smt-droplet ignore`
    WOULD_POST = "would-post"  # check mode
    NOT_ATTEMPTED = "not-attempted"  # the pass stopped before this file
    UNRECORDED = "posted-unrecorded"  # the app answered 200 but the ledger append failed
    FATAL = "fatal"  # 401/503/INLINE_DISABLED: the token or the app's setup; the pass stops
    WAITING = "waiting-for-app"  # HOME_ID_REQUIRED: the app does not know the ESIID yet
    SKIPPED_WAITING = "skipped-waiting"  # waiting, and not due for its slow retry yet


RETRY_OUTCOMES = frozenset({Outcome.FAILED, Outcome.NOT_ATTEMPTED, Outcome.UNRECORDED})
NEEDS_OPERATOR = frozenset(
    {
        Outcome.NO_ESIID,
        Outcome.REJECTED,
        Outcome.TOO_LARGE,
        Outcome.NOT_CSV,
        Outcome.SKIPPED_REJECTED,
        Outcome.SKIPPED_TOO_LARGE,
        Outcome.SKIPPED_NOT_CSV,
    }
)
# What the ledger remembers as settled for the same bytes (not posted again until `forget`).
SETTLED_STATES = {
    Outcome.REJECTED: Outcome.SKIPPED_REJECTED,
    Outcome.TOO_LARGE: Outcome.SKIPPED_TOO_LARGE,
    Outcome.NOT_CSV: Outcome.SKIPPED_NOT_CSV,
    Outcome.IGNORED: Outcome.IGNORED,
}
ACCEPTED_OUTCOMES = frozenset({Outcome.POSTED, Outcome.DUPLICATE})
# Files the app cannot take yet for a reason it can heal by itself (the customer's address is
# added in the app): retried every SMT_WAITING_RETRY_SECONDS without an operator.
WAITING_OUTCOMES = frozenset({Outcome.WAITING, Outcome.SKIPPED_WAITING})
# The order of the summary line (other outcomes follow, sorted).
SUMMARY_ORDER = (
    Outcome.POSTED,
    Outcome.DUPLICATE,
    Outcome.SKIPPED_POSTED,
    Outcome.REJECTED,
    Outcome.TOO_LARGE,
    Outcome.FAILED,
    Outcome.NO_ESIID,
    Outcome.WAITING,
    Outcome.IGNORED,
)


@dataclass(slots=True)
class FileResult:
    """What happened to one file in a pass (slotted: a pass holds one per inbox file)."""

    path: str
    outcome: Outcome
    sha256: str | None = None
    esiid: str | None = None
    meter: str | None = None
    app_id: str | None = None
    reason: str = ""
    size: int = 0
    member: str | None = None  # PGP delivery: the zip entry that was (or would be) posted
    summary: dict[str, Any] | None = None  # csvdata.DataSummary.to_dict() of what was posted
    reported_before: bool = False  # needs an operator, and an earlier pass already said so
    landing: dict[str, Any] | None = None  # landing.Landing.to_dict(): what the app stored

    @property
    def needs_operator(self) -> bool:
        return self.outcome in NEEDS_OPERATOR

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (a module's ``results``)."""
        return {**asdict(self), "outcome": str(self.outcome), "needs_operator": self.needs_operator}


@dataclass
class PassResult:
    """Everything a pass did; ``exit_code`` follows the rules in the module docstring."""

    files: list[FileResult] = field(default_factory=list)
    sync: Any = None  # sftp_mirror.MirrorResult when a sync ran
    sync_error: str | None = None
    fatal: str | None = None
    ledger_error: str | None = None  # sidecar not saved (the posts themselves are recorded)
    requests: int = 0
    started_at: float = field(default_factory=time.time)
    sync_seconds: float = 0.0
    post_seconds: float = 0.0
    inbox_files: int = 0  # files the pass looked at (the whole inbox unless given paths)
    inbox_bytes: int = 0
    inbox_needs_operator: int | None = None  # the whole inbox's, from the ledger
    inbox_waiting: int | None = None  # the whole inbox's files waiting for the app
    retired: int = 0  # files retention took out of the inbox
    remote_completed: int = 0  # files deleted or moved on SFTP after their post
    remote_completion_failed: int = 0
    # a person's decisions this pass carried out: {"action", "path", "sha256", "by"}
    decisions: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {str(k): v for k, v in Counter(f.outcome for f in self.files).items()}

    def needing_operator(self) -> list[FileResult]:
        return [f for f in self.files if f.needs_operator]

    @property
    def exit_code(self) -> ExitCode:
        if self.fatal:
            return ExitCode.CONFIG
        if (
            self.sync_error
            or self.ledger_error
            or any(f.outcome in RETRY_OUTCOMES for f in self.files)
        ):
            return ExitCode.RETRY
        return ExitCode.OK

    @property
    def changed(self) -> bool:
        return any(f.outcome in ACCEPTED_OUTCOMES for f in self.files)

    def summary_line(self) -> str:
        counts = self.counts()
        parts = [f"{name}={counts.get(name, 0)}" for name in SUMMARY_ORDER]
        parts += [f"{k}={v}" for k, v in sorted(counts.items()) if k not in SUMMARY_ORDER]
        parts.append(f"needs-operator={len(self.needing_operator())}")
        if self.sync is not None:
            parts.append(f"downloaded={len(self.sync.downloaded)}")
        if self.sync_error:
            parts.append("sync=failed")
        if self.ledger_error:
            parts.append("ledger=failed")
        parts.append(f"exit={int(self.exit_code)}")
        return "summary " + " ".join(parts)

    @property
    def bytes_downloaded(self) -> int:
        return sum(f.size for f in self.sync.downloaded) if self.sync is not None else 0

    @property
    def bytes_posted(self) -> int:
        return sum(f.size for f in self.files if f.outcome in ACCEPTED_OUTCOMES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "finished_at": iso_utc(),
            "started_ts": round(self.started_at, 3),
            "sync_seconds": round(self.sync_seconds, 3),
            "post_seconds": round(self.post_seconds, 3),
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_posted": self.bytes_posted,
            "inbox_files": self.inbox_files,
            "inbox_bytes": self.inbox_bytes,
            "exit_code": int(self.exit_code),
            "counts": self.counts(),
            "needs_operator": (
                len(self.needing_operator())
                if self.inbox_needs_operator is None
                else self.inbox_needs_operator
            ),
            "waiting_for_app": (
                sum(f.outcome in WAITING_OUTCOMES for f in self.files)
                if self.inbox_waiting is None
                else self.inbox_waiting
            ),
            "downloaded": len(self.sync.downloaded) if self.sync is not None else None,
            "sync_error": self.sync_error,
            "fatal": self.fatal,
            "ledger_error": self.ledger_error,
            "requests": self.requests,
            "retired": self.retired,
            "remote_completed": self.remote_completed,
            "remote_completion_failed": self.remote_completion_failed,
            "skipped_no_space": (
                self.sync.count("skipped-no-space") if self.sync is not None else 0
            ),
            "decisions": list(self.decisions),
        }
