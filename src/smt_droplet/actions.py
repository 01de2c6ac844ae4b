"""An operator's decisions about one file: ``forget`` (post it again) and ``ignore`` (never post).

The one implementation behind ``smt-droplet forget|ignore`` and behind the operator page's
buttons. The page's server (the upload server's user) cannot write the ledger, so it queues the
decision as a spool request (``kind="page"``, ``extra["action"]``); the next ingest pass, which
owns the ledger, applies it under the pass lock (:func:`apply_requests`) before it posts anything.
The caller of :func:`forget` and :func:`ignore` holds the lock and saves the ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from . import spool
from .ledger import Ledger, LedgerError, is_digest
from .outcomes import Outcome

log = logging.getLogger("smt_droplet.ingest")

PAGE_ACTIONS = ("forget", "ignore")


class ActionError(ValueError):
    """The decision cannot apply to this file (e.g. ignoring one that is already posted)."""


def forget(ledger: Ledger, digest: str, rel: str, by: str = "page") -> int:
    """Drop ``digest`` from the ledger and its sidecar state; the next pass handles it again.

    Returns the ledger lines removed (0 with a warning when the ledger did not know it)."""
    previous = ledger.outcome(digest)
    known = ledger.is_posted(digest) or previous is not None
    removed = ledger.forget({digest})
    if known:
        then = (
            "the next pass attributes it again: it still needs an ESIID (`smt-droplet post "
            "FILE --esiid ESIID`, or ESIID_DEFAULT) unless its name or content gained one"
            if previous is not None and previous.status == Outcome.NO_ESIID
            else "the next pass posts it again"
        )
        log.info(
            "forgot %s sha256=%s (%d ledger line(s)) by %s; %s", rel, digest, removed, by, then
        )
    else:
        log.warning("forget: %s (%s) was not in the ledger %s", rel, digest, ledger.state_file)
    return removed


def ignore(ledger: Ledger, digest: str, rel: str, reason: str, by: str) -> None:
    """Settle a file for good: a tombstone in the sidecar, never posted, shown as ``ignored``."""
    reason = " ".join(reason.split())
    if not reason:
        raise ActionError("ignore needs a reason (it is shown in status)")
    if ledger.is_posted(digest):
        raise ActionError(f"{rel} sha256={digest} was already posted; nothing to ignore")
    previous = ledger.outcomes.get(digest) or {}
    kept: dict[str, Any] = {k: previous[k] for k in ("esiid", "meter", "summary") if k in previous}
    kept["was"] = previous.get("status")
    ledger.record_outcome(digest, Outcome.IGNORED, reason, rel, {**kept, "by": by})
    log.info(
        "ignored %s sha256=%s: %s (by %s; undo with `smt-droplet forget %s`)",
        rel,
        digest,
        reason,
        by,
        digest[:12],
    )


def apply_requests(ledger: Ledger, requests: Iterable[spool.Request]) -> list[dict[str, str]]:
    """Apply the page's queued decisions in the order they were made; returns those that did
    (action, path, sha256, who made it), for the pass record.

    A request that cannot apply (an unknown action, a bad digest, ignoring a posted file) is
    logged as a warning and dropped: the page shows the file's state as it is."""
    applied: list[dict[str, str]] = []
    for request in sorted(requests, key=lambda r: r.received_at):  # ids sort by the second only
        action = request.extra.get("action") if request.kind == "page" else None
        if action not in PAGE_ACTIONS:
            continue
        digest = str(request.extra.get("sha256") or "")
        by = str(request.extra.get("by") or "page")
        if not is_digest(digest):
            log.warning("page request %s: %r is not a sha256; dropped", request.id, digest)
            continue
        held = ledger.path_of(digest)  # one scan of the hash cache
        if held is None and not (ledger.is_posted(digest) or ledger.outcome(digest) is not None):
            log.warning(
                "page request %s (%s): sha256=%s is no file this droplet holds; dropped",
                request.id,
                action,
                digest,
            )
            continue
        rel = held or request.filename or digest
        try:
            if action == "forget":
                forget(ledger, digest, rel, by)
            else:
                ignore(ledger, digest, rel, str(request.reason or ""), by)
        except ActionError as exc:
            log.warning("page request %s (%s): %s; dropped", request.id, action, exc)
            continue
        except LedgerError as exc:
            log.error("page request %s (%s): %s", request.id, action, exc)
            continue
        applied.append({"action": str(action), "path": rel, "sha256": digest, "by": by})
    return applied
