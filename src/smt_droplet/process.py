"""One file: decide → act → record. :func:`process_file` is the only caller of ``post_file``.

The pass, the ``post`` command and the ``smt_inline_post`` module all go through it::

    digest (cached by size+mtime) → settled? (posted, or rejected/too large/not a CSV/ignored
    before) → read → a CSV at all? and its data summary (csvdata.py) → check mode? →
    attribute (attribution.py) → post (inline_post.py) → record (ledger.py)

Files that need an operator (no ESIID, rejected, too large, not a CSV) are recorded in the
ledger's sidecar with their reason, ESIID, meter and data summary; a later pass that meets the
same bytes again marks its result ``reported_before`` (one DEBUG line, not another warning). A
``no-esiid`` file is attributed again on every pass (a request or ``ESIID_DEFAULT`` may have
arrived since); the others are settled until ``forget``.

Check mode is decided in one place, :func:`process_file`: nothing is decrypted, posted or
recorded; the result says ``would-post`` (or ``no-esiid``) with the ESIID the file would get.

PGP deliveries (SMT's ``*.asc``; the content decides, not the name): the ``.asc``'s digest is
what the ledger is checked against, so a delivery is decrypted once. An unposted one is
decrypted (:mod:`smt_droplet.pgp_delivery`, settings ``SMT_GNUPG_HOME`` & co.), its interval CSV
is attributed (the ``.asc`` name, then the member's name, then the CSV column, then defaults) and
posted under the member's base name; on success both the CSV's and the ``.asc``'s digests are
recorded. The file's own faults mark the ``.asc`` ``rejected`` with ``pgp:<code>: <reason>``;
ours (gpg missing, timeout, locked key) are ``failed-will-retry``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import landing
from .attribution import HEAD_BYTES, attribute
from .config import ConfigError, PgpSettings, PostSettings
from .csvdata import brief, sniff, summarize
from .esiid import esiid_from_name, meter_from_name, normalize_esiid
from .inbox import InboxFile
from .ledger import Ledger
from .outcomes import ACCEPTED_OUTCOMES, SETTLED_STATES, WAITING_OUTCOMES, FileResult, Outcome
from .pgp_delivery import DeliveryError, ExtractedCsv, extract, looks_armored
from .plan import RunPlan

log = logging.getLogger("smt_droplet.ingest")

# (esiid, meter) pairs in falling priority: operator override, the file's own upload request,
# the run's trigger (files this pass downloaded only), the environment's defaults.
Defaults = list[tuple[str | None, str | None]]


@dataclass
class PostContext:
    """What :func:`process_file` needs besides the file (built once per pass)."""

    settings: PostSettings
    ledger: Ledger
    session: Any = None  # requests.Session, created by the first POST (never in check mode)
    plan: RunPlan = field(default_factory=RunPlan)
    check: bool = False
    pgp: PgpSettings = field(default_factory=PgpSettings)


def file_digest(ledger: Ledger, item: InboxFile) -> tuple[str, bytes]:
    """(sha256, bytes) of a file; the bytes are read once and reused for the POST."""
    data = item.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ledger.remember_digest(item.rel, item.size, item.mtime_ns, digest)
    return digest, data


def process_file(
    ctx: PostContext,
    item: InboxFile,
    *,
    force: bool = False,
    esiid: str | None = None,
    meter: str | None = None,
) -> FileResult:
    """Decide and do what happens to one file.

    ``esiid``/``meter`` are explicit operator overrides (``post --esiid``); they beat everything.
    """
    result = FileResult(path=item.rel, outcome=Outcome.NOT_ATTEMPTED, size=item.size)
    data = _unsettled_bytes(
        ctx.ledger,
        item,
        result,
        force=force or ctx.plan.forces(item.rel),
        retry_every=ctx.settings.waiting_retry,
    )
    if data is None:
        return result
    defaults: Defaults = [
        (normalize_esiid(esiid), meter),
        *ctx.plan.defaults_for(item.rel),
        _tried_before(ctx.ledger, result.sha256),
        (ctx.settings.esiid_default, ctx.settings.meter_default),
    ]
    armored = looks_armored(data)  # content decides, not the name
    if not armored and not _is_csv(ctx, result, data, item.rel):
        return result
    if ctx.check:
        return _would_post(result, item, data, defaults, armored)
    if armored:
        return _process_delivery(ctx, item, result, data, defaults)
    if _attribute_plain(result, item, data, defaults):
        _post_and_record(ctx, result, item.path, data, item.mtime, item.rel)
    else:
        _note_no_esiid(ctx.ledger, result, item.rel)
    return result


# -- decide ---------------------------------------------------------------------------------


def _tried_before(ledger: Ledger, digest: str | None) -> tuple[str | None, str | None]:
    """The ESIID and meter a failed post of these bytes went out with (an operator's "post with
    ESIID" decision, a trigger's default): it lasts until the file is posted or changed."""
    record = ledger.outcomes.get(digest or "") or {}
    if record.get("status") != Outcome.FAILED:
        return None, None
    return record.get("esiid"), record.get("meter")


def _unsettled_bytes(
    ledger: Ledger, item: InboxFile, result: FileResult, *, force: bool, retry_every: float
) -> bytes | None:
    """The file's bytes if it still needs posting; ``None`` once ``result`` says why not."""
    digest = ledger.cached_digest(item.rel, item.size, item.mtime_ns)
    data: bytes | None = None
    if digest is None:
        try:
            digest, data = file_digest(ledger, item)
        except OSError as exc:
            _unreadable(result, exc)
            return None
    result.sha256 = digest
    if not force and _settled(ledger, digest, result, retry_every):
        return None
    if data is None:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            _unreadable(result, exc)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            # Changed under an unchanged (size, mtime): hash it again next pass.
            ledger.invalidate_digest(item.rel)
            result.outcome, result.reason = Outcome.FAILED, "content changed while reading"
            return None
    return data


def _unreadable(result: FileResult, exc: OSError) -> None:
    result.outcome, result.reason = Outcome.FAILED, f"cannot read: {exc.strerror or exc}"


def _settled(ledger: Ledger, digest: str, result: FileResult, retry_every: float) -> bool:
    """Already posted, refused before for a reason the same bytes cannot fix, ignored, or
    waiting for the app and not due for its slow retry yet."""
    if ledger.is_posted(digest):
        result.outcome = Outcome.SKIPPED_POSTED
        return True
    previous = ledger.outcome(digest)
    if previous is not None and previous.status == Outcome.WAITING:
        if time.time() - previous.at < retry_every:
            record = ledger.outcomes.get(digest) or {}
            result.outcome, result.reason = Outcome.SKIPPED_WAITING, previous.reason
            result.esiid, result.meter = record.get("esiid"), record.get("meter")
            result.reported_before = True
            return True
        return False
    if previous is None or previous.status not in SETTLED_STATES:
        return False
    result.outcome = SETTLED_STATES[Outcome(previous.status)]
    result.reason = previous.reason
    result.reported_before = True
    record = ledger.outcomes.get(digest) or {}
    result.esiid, result.meter = record.get("esiid"), record.get("meter")
    return True


def _is_csv(ctx: PostContext, result: FileResult, data: bytes, rel: str) -> bool:
    """Sniff and summarize a plain file; one that is not a CSV is settled as ``not-csv``."""
    ok, why = sniff(data)
    if not ok:
        result.outcome, result.reason = Outcome.NOT_CSV, why
        if not ctx.check:
            assert result.sha256 is not None
            ctx.ledger.record_outcome(result.sha256, Outcome.NOT_CSV, why, rel)
        return False
    result.summary = summarize(data).to_dict()
    return True


def _note_no_esiid(ledger: Ledger, result: FileResult, rel: str) -> None:
    """Remember a ``no-esiid`` file (for ``status``), and whether an earlier pass said so."""
    assert result.sha256 is not None
    previous = ledger.outcome(result.sha256)
    result.reported_before = previous is not None and previous.status == Outcome.NO_ESIID
    if result.reported_before and previous is not None and previous.path == rel:
        return  # unchanged: an idle pass must not rewrite the sidecar for it
    ledger.record_outcome(result.sha256, Outcome.NO_ESIID, result.reason, rel, facts(result))


def facts(result: FileResult) -> dict[str, Any]:
    """What the ledger keeps about a file besides its outcome (only what is known)."""
    known = {"esiid": result.esiid, "meter": result.meter, "summary": result.summary}
    if result.member:
        known["member"] = result.member
    return {k: v for k, v in known.items() if v is not None}


def _attribute_plain(result: FileResult, item: InboxFile, data: bytes, defaults: Defaults) -> bool:
    """ESIID and meter of a plain CSV; ``False`` (outcome ``no-esiid``) if there is none."""
    override_esiid, override_meter = defaults[0]
    who = attribute(item.path, defaults, head=data[:HEAD_BYTES])
    result.esiid = override_esiid or who.esiid
    result.meter = override_meter or who.meter
    if result.esiid is None:
        result.outcome = Outcome.NO_ESIID
        result.reason = (
            "no ESIID in the name, the content, a request or ESIID_DEFAULT; settle it with "
            f"`smt-droplet post {item.rel} --esiid ESIID` or `smt-droplet ignore {item.rel} "
            "--reason TEXT`"
        )
        return False
    return True


def _would_post(
    result: FileResult, item: InboxFile, data: bytes, defaults: Defaults, armored: bool
) -> FileResult:
    """Check mode: what the file would get. A PGP delivery is not decrypted: its ESIID comes
    from the ``.asc`` name and the defaults."""
    if not armored:
        if _attribute_plain(result, item, data, defaults):
            result.outcome = Outcome.WOULD_POST
        return result
    override_esiid, override_meter = defaults[0]
    fallback = attribute(item.path, defaults[1:], head=b"")
    result.esiid = override_esiid or esiid_from_name(item.path.name) or fallback.esiid
    result.meter = override_meter or meter_from_name(item.path.name) or fallback.meter
    result.outcome = Outcome.WOULD_POST
    result.reason = "pgp delivery: not decrypted in check mode"
    return result


# -- act and record -------------------------------------------------------------------------


def _process_delivery(
    ctx: PostContext, item: InboxFile, result: FileResult, data: bytes, defaults: Defaults
) -> FileResult:
    """A PGP-armored delivery: decrypt, take the interval CSV out of the zip, post that.

    ESIID: operator override, then the ``.asc`` name, the zip member's name, the CSV's ESIID
    column, then the defaults. Meter likewise (``M<digits>`` in a name, then the defaults).
    The plaintext exists only inside the ``with`` block (a private directory under
    ``SMT_PGP_TMPDIR``).
    """
    digest = result.sha256
    assert digest is not None
    try:
        with extract(ctx.pgp, item.path, armored=data) as x:
            result.member = x.member
            try:
                csv = x.path.read_bytes()
            except OSError as exc:  # the extracted CSV vanished under us (tmp cleaner): retry
                result.outcome, result.reason = Outcome.FAILED, f"pgp:io: {exc.strerror or exc}"
                return result
            if not _is_csv(ctx, result, csv, item.rel):
                return result
            if _attribute_member(result, item, x, csv, defaults):
                _post_and_record(ctx, result, x.path, csv, item.mtime, item.rel, delivery=x)
            else:
                _note_no_esiid(ctx.ledger, result, item.rel)
    except DeliveryError as exc:
        reason = f"pgp:{exc.code}: {exc.reason}"
        status = Outcome.FAILED if exc.retryable else Outcome.REJECTED
        # FAILED is remembered only for `status`; a pass skips only rejected/too-large.
        ctx.ledger.record_outcome(
            digest, status, reason, item.rel, {"via": "pgp", "code": exc.code}
        )
        result.outcome, result.reason = status, reason
    except ConfigError as exc:  # SMT_GNUPG_PASSPHRASE_FILE unreadable: ours to fix, retry
        result.outcome, result.reason = Outcome.FAILED, f"pgp:config: {exc}"
    # A LedgerError (the append after a 200) propagates to the pass, as for any file.
    return result


def _attribute_member(
    result: FileResult, item: InboxFile, x: ExtractedCsv, csv: bytes, defaults: Defaults
) -> bool:
    override_esiid, override_meter = defaults[0]
    who = attribute(x.path, defaults[1:], head=csv[:HEAD_BYTES])
    name = item.path.name
    result.esiid = override_esiid or esiid_from_name(name) or esiid_from_name(x.member) or who.esiid
    result.meter = override_meter or meter_from_name(name) or meter_from_name(x.member) or who.meter
    if result.esiid is None:
        result.outcome = Outcome.NO_ESIID
        result.reason = (
            f"no ESIID in the .asc name, member {x.member!r}, its content, a request "
            f"or ESIID_DEFAULT; settle it with `smt-droplet post {item.rel} --esiid ESIID` or "
            f"`smt-droplet ignore {item.rel} --reason TEXT`"
        )
        return False
    return True


def _post_and_record(
    ctx: PostContext,
    result: FileResult,
    path: Path,
    data: bytes,
    mtime: float,
    rel: str,
    delivery: ExtractedCsv | None = None,
) -> None:
    """POST ``data`` (named ``path.name``) and record the answer under ``result.sha256``.

    ``delivery``: the CSV came out of that PGP delivery (``result`` is the ``.asc``'s); on
    success the CSV's digest is recorded first, then the ``.asc``'s (what the next pass looks up),
    and every record carries the member's name.
    """
    from . import inline_post  # requests is imported only when something is posted

    assert result.sha256 is not None and result.esiid is not None
    if ctx.session is None:  # an idle pass never imports requests nor builds a session
        ctx.session = new_session()
    answer = inline_post.post_file(
        ctx.session,
        ctx.settings,
        path,
        esiid=result.esiid,
        meter=result.meter or ctx.settings.meter_default,
        data=data,
        mtime=mtime,
        summary=result.summary,
    )
    result.app_id = answer.app_id
    result.landing = answer.landing
    _record(ctx.ledger, result, answer, rel, delivery, ctx.settings.waiting_retry)


def _record(
    ledger: Ledger,
    result: FileResult,
    answer: Any,
    rel: str,
    delivery: ExtractedCsv | None,
    retry_every: float,
) -> None:
    """Write the app's answer (an ``inline_post.PostOutcome``) into the ledger and ``result``."""
    digest = result.sha256
    assert digest is not None
    extra = facts(result)
    if delivery is not None:
        extra.update(via="pgp", member=delivery.member, csv_sha256=delivery.csv_sha256)
    if answer.landing is not None:
        extra["landing"] = answer.landing
    if answer.parts > 1:
        extra["parts"] = answer.parts
    if answer.outcome in ACCEPTED_OUTCOMES:
        duplicate = answer.outcome == Outcome.DUPLICATE
        if delivery is not None and not ledger.is_posted(delivery.csv_sha256):
            # The same interval CSV arriving later in plain text is then a no-op.
            ledger.record_posted(
                delivery.csv_sha256,
                f"{rel}!{delivery.member}",
                answer.app_id,
                duplicate,
                {**facts(result), "via": "pgp", "delivery_sha256": digest},
            )
        ledger.record_posted(digest, rel, answer.app_id, duplicate, extra)
        result.outcome = answer.outcome
    elif answer.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
        ledger.record_outcome(digest, answer.outcome, answer.reason, rel, extra)
        result.outcome, result.reason = answer.outcome, answer.reason
    elif answer.outcome == Outcome.WAITING:
        result.outcome = Outcome.WAITING
        result.reason = (
            f"the app does not know ESIID {result.esiid} yet (HOME_ID_REQUIRED): add the "
            "customer's address in the app; tried again every "
            f"{_hours(retry_every)}"
        )
        ledger.record_outcome(digest, Outcome.WAITING, result.reason, rel, extra)
    elif answer.outcome == Outcome.FATAL:
        result.outcome, result.reason = Outcome.FATAL, answer.reason
    else:
        result.outcome = Outcome.FAILED
        result.reason = (
            f"{answer.reason} (after {answer.attempts} attempts); the next pass tries again"
        )
        # remembered for `status`, the page and the pass record; never settles the file
        ledger.record_outcome(
            digest,
            Outcome.FAILED,
            result.reason,
            rel,
            {**extra, "attempts": answer.attempts, "http_status": answer.status},
        )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def new_session() -> Any:
    """The HTTP session of a pass (``requests`` is imported only here)."""
    import requests

    session = requests.Session()
    session.headers["user-agent"] = "smt-droplet"
    return session


# -- the journal line -----------------------------------------------------------------------


def log_result(r: FileResult) -> None:
    """One line per file and outcome. Already-posted and ignored files, and files an earlier
    pass already reported as needing an operator, go at DEBUG: an idle pass over thousands of
    files would flood the journal; the summary line counts them."""
    data = f" {brief(r.summary)}" if r.summary else ""
    if r.outcome in ACCEPTED_OUTCOMES:
        landed = r.landing or {}
        not_landed = landed.get("verdict") in landing.NOT_LANDED
        log.log(
            logging.WARNING if not_landed else logging.INFO,
            "%s %s esiid=%s meter=%s sha256=%s id=%s%s %s%s%s",
            r.outcome,
            r.path,
            r.esiid,
            r.meter,
            r.sha256,
            r.app_id,
            f" pgp-member={r.member}" if r.member else "",
            landing.brief(landed),
            data,
            f" — {landed.get('detail')}" if not_landed else "",
        )
    elif r.outcome in WAITING_OUTCOMES:
        level = logging.DEBUG if r.reported_before else logging.WARNING
        log.log(level, "%s %s %s sha256=%s", r.outcome, r.path, r.reason, r.sha256)
    elif r.outcome in (Outcome.SKIPPED_POSTED, Outcome.IGNORED):
        log.debug("%s %s sha256=%s %s", r.outcome, r.path, r.sha256, r.reason)
    elif r.needs_operator:
        level = logging.DEBUG if r.reported_before else logging.WARNING
        log.log(
            level,
            "%s %s needs an operator: %s sha256=%s%s",
            r.outcome,
            r.path,
            r.reason,
            r.sha256,
            data,
        )
    elif r.outcome == Outcome.FAILED:
        log.warning("%s %s %s", r.outcome, r.path, r.reason)
    elif r.outcome == Outcome.WOULD_POST:
        log.info(
            "would-post %s esiid=%s meter=%s sha256=%s%s", r.path, r.esiid, r.meter, r.sha256, data
        )
    else:
        log.info("%s %s %s", r.outcome, r.path, r.reason)
