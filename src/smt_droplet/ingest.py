"""One ingest pass, and the ``ingest``/``sync``/``status``/``forget``/``post`` commands.

A pass (``smt-droplet ingest``, the timer's and the ``.path`` unit's job)::

    lock (lock.py) → claim spool requests → sync (sftp_mirror.py) → for each inbox file:
    hash (cached) → skip if in the ledger → attribute (attribution.py) → post (inline_post.py)
    → record (ledger.py) → finish spool requests → write last result → exit code

:func:`process_file` is the one place that decides what happens to a file; the pass, the
``post`` command and the ``smt_inline_post`` module all go through it.

PGP deliveries (SMT's ``*.asc``; the content decides, not the name): the ``.asc``'s digest is
what the ledger is checked against, so a delivery is decrypted once. An unposted one is
decrypted (:mod:`smt_droplet.pgp_delivery`, settings ``SMT_GNUPG_HOME`` & co.), its interval CSV
is attributed (the ``.asc`` name, then the member's name, then the CSV column, then defaults) and
posted under the member's base name; on success both the CSV's and the ``.asc``'s digests are
recorded. The file's own faults mark the ``.asc`` ``rejected`` with ``pgp:<code>: <reason>``;
ours (gpg missing, timeout, locked key) are ``failed-will-retry``. See :func:`_process_delivery`.

Spool requests (written by the webhook and the upload server) steer one pass:

* a request naming a ``filename`` (an upload) gives that file its ESIID/meter default;
* requests without a file name give the run's defaults. If the requests claimed together carry
  **different** ESIIDs (or meters), none of them is used as the run default — a wrong ESIID is
  worse than none — and the pass logs ``conflicting ESIIDs in spool requests``; files then fall
  back to ``ESIID_DEFAULT`` (or ``no-esiid``). If they agree, that value is the default.
* ``force_repost`` re-posts files already in the ledger: only the named file if the request has
  a ``filename``, else every file in the inbox.

Defaults never beat what the file itself says (ESIID in the name or the CSV's ESIID column).

Exit codes (``cli.py``): 0 — every file posted or deliberately skipped (already posted, rejected,
too large: see ``smt-droplet status``), or another pass holds the lock; 1 — something is left to
retry (a POST failed after its retries, a file without ESIID, the SFTP sync failed); 2 —
configuration error (missing setting, unreadable key, unknown/changed host key, 401/503 from the
app). Skipped-already-posted files are logged at DEBUG (an idle pass over thousands of files
would flood the journal); their count is in the summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import spool
from .attribution import HEAD_BYTES, attribute, esiid_from_name, meter_from_name, normalize_esiid
from .config import LEDGER_BASENAME, ConfigError, PostSettings, SftpSettings, split_globs, spool_dir
from .inbox import InboxFile, inbox_file, scan_inbox
from .ledger import Ledger, LedgerError, is_digest
from .lock import LockBusy, PassLock, lock_path_for
from .pgp_delivery import DeliveryError, ExtractedCsv, PgpSettings, looks_armored

log = logging.getLogger("smt_droplet.ingest")

EXIT_OK, EXIT_RETRY, EXIT_CONFIG = 0, 1, 2

# Per-file outcomes (log words and result values).
POSTED = "posted"
DUPLICATE = "duplicate"
SKIPPED_POSTED = "skipped-already-posted"
SKIPPED_REJECTED = "skipped-rejected"
SKIPPED_TOO_LARGE = "skipped-too-large"
REJECTED = "rejected"
TOO_LARGE = "too-large"
FAILED = "failed-will-retry"
NO_ESIID = "no-esiid"
WOULD_POST = "would-post"
NOT_ATTEMPTED = "not-attempted"
UNRECORDED = "posted-unrecorded"  # the app answered 200 but the ledger append failed
RETRY_OUTCOMES = {FAILED, NO_ESIID, NOT_ATTEMPTED, UNRECORDED}


@dataclass
class FileResult:
    """What happened to one file in a pass."""

    path: str
    outcome: str
    sha256: str | None = None
    esiid: str | None = None
    meter: str | None = None
    app_id: str | None = None
    reason: str = ""
    size: int = 0
    member: str | None = None  # PGP delivery: the zip entry that was (or would be) posted


@dataclass
class PassResult:
    """Everything a pass did; ``exit_code`` follows the rules in the module docstring."""

    files: list[FileResult] = field(default_factory=list)
    sync: Any = None  # sftp_mirror.MirrorResult when a sync ran
    sync_error: str | None = None
    fatal: str | None = None
    ledger_error: str | None = None  # sidecar not saved (the posts themselves are recorded)
    requests: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(f.outcome for f in self.files))

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return EXIT_CONFIG
        if (
            self.sync_error
            or self.ledger_error
            or any(f.outcome in RETRY_OUTCOMES for f in self.files)
        ):
            return EXIT_RETRY
        return EXIT_OK

    @property
    def changed(self) -> bool:
        return any(f.outcome in (POSTED, DUPLICATE) for f in self.files)

    def summary_line(self) -> str:
        counts = self.counts()
        order = [POSTED, DUPLICATE, SKIPPED_POSTED, REJECTED, TOO_LARGE, FAILED, NO_ESIID]
        parts = [f"{name}={counts.get(name, 0)}" for name in order]
        parts += [f"{k}={v}" for k, v in sorted(counts.items()) if k not in order]
        if self.sync is not None:
            parts.append(f"downloaded={len(self.sync.downloaded)}")
        if self.sync_error:
            parts.append("sync=failed")
        if self.ledger_error:
            parts.append("ledger=failed")
        parts.append(f"exit={self.exit_code}")
        return "summary " + " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "downloaded": len(self.sync.downloaded) if self.sync is not None else None,
            "sync_error": self.sync_error,
            "fatal": self.fatal,
            "ledger_error": self.ledger_error,
            "requests": self.requests,
        }


@dataclass
class RunPlan:
    """What the claimed spool requests ask of this pass."""

    esiid: str | None = None
    meter: str | None = None
    per_file: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    force_all: bool = False
    force_files: set[str] = field(default_factory=set)


def plan_from_requests(requests: Iterable[spool.Request]) -> RunPlan:
    """Apply the spool rules from the module docstring."""
    plan = RunPlan()
    esiids: set[str] = set()
    meters: set[str] = set()
    for req in requests:
        esiid = normalize_esiid(req.esiid)
        meter = (req.meter or "").strip() or None
        if req.filename:
            name = os.path.basename(req.filename)
            plan.per_file[name] = (esiid, meter)
            if req.force_repost:
                plan.force_files.add(name)
            continue
        if esiid:
            esiids.add(esiid)
        if meter:
            meters.add(meter)
        if req.force_repost:
            plan.force_all = True
    if len(esiids) == 1:
        plan.esiid = esiids.pop()
    elif esiids:
        log.warning(
            "conflicting ESIIDs in spool requests (%s); using none of them as the default",
            ",".join(sorted(esiids)),
        )
    if len(meters) == 1:
        plan.meter = meters.pop()
    elif meters:
        log.warning("conflicting meters in spool requests; using none of them as the default")
    return plan


# -- the inbox ------------------------------------------------------------------------------


def file_digest(ledger: Ledger, item: InboxFile) -> tuple[str, bytes]:
    """(sha256, bytes) of a file; the bytes are read once and reused for the POST."""
    data = item.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ledger.remember_digest(item.rel, item.size, item.mtime_ns, digest)
    return digest, data


# -- one file -------------------------------------------------------------------------------


@dataclass
class PostContext:
    """What :func:`process_file` needs besides the file (built once per pass)."""

    settings: PostSettings
    ledger: Ledger
    session: Any = None  # requests.Session, created by the first POST (never in check mode)
    plan: RunPlan = field(default_factory=RunPlan)
    check: bool = False
    pgp: PgpSettings = field(default_factory=PgpSettings)


def _log_result(r: FileResult) -> None:
    if r.outcome in (POSTED, DUPLICATE):
        log.info(
            "%s %s esiid=%s meter=%s sha256=%s id=%s%s",
            r.outcome,
            r.path,
            r.esiid,
            r.meter,
            r.sha256,
            r.app_id,
            f" pgp-member={r.member}" if r.member else "",
        )
    elif r.outcome == SKIPPED_POSTED:
        log.debug("%s %s sha256=%s", r.outcome, r.path, r.sha256)
    elif r.outcome == REJECTED:
        log.warning("rejected %s code=%s", r.path, r.reason)
    elif r.outcome == TOO_LARGE:
        log.warning("too-large %s %s", r.path, r.reason)
    elif r.outcome in (FAILED, NO_ESIID):
        log.warning("%s %s %s", r.outcome, r.path, r.reason)
    elif r.outcome == WOULD_POST:
        log.info("would-post %s esiid=%s meter=%s sha256=%s", r.path, r.esiid, r.meter, r.sha256)
    else:
        log.info("%s %s %s", r.outcome, r.path, r.reason)


def process_file(
    ctx: PostContext,
    item: InboxFile,
    *,
    force: bool = False,
    esiid: str | None = None,
    meter: str | None = None,
) -> FileResult:
    """Decide and do what happens to one file; the only caller of ``post_file``.

    ``esiid``/``meter`` are explicit operator overrides (``post --esiid``); they beat everything.
    """
    ledger, settings = ctx.ledger, ctx.settings
    base = os.path.basename(item.rel)
    force = force or ctx.plan.force_all or base in ctx.plan.force_files
    result = FileResult(path=item.rel, outcome=NOT_ATTEMPTED, size=item.size)

    digest = ledger.cached_digest(item.rel, item.size, item.mtime_ns)
    data: bytes | None = None
    if digest is None:
        try:
            digest, data = file_digest(ledger, item)
        except OSError as exc:
            result.outcome, result.reason = FAILED, f"cannot read: {exc.strerror or exc}"
            return result
    result.sha256 = digest
    if not force:
        if ledger.is_posted(digest):
            result.outcome = SKIPPED_POSTED
            return result
        previous = ledger.outcome(digest)
        if previous is not None and previous.status in (REJECTED, TOO_LARGE):
            result.outcome = SKIPPED_REJECTED if previous.status == REJECTED else SKIPPED_TOO_LARGE
            result.reason = previous.reason
            return result

    if data is None:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            result.outcome, result.reason = FAILED, f"cannot read: {exc.strerror or exc}"
            return result
        if hashlib.sha256(data).hexdigest() != digest:
            # Changed under an unchanged (size, mtime): re-hash next pass.
            ledger.hashes.pop(item.rel, None)
            result.outcome, result.reason = FAILED, "content changed while reading"
            return result

    defaults = [
        (normalize_esiid(esiid), meter),
        ctx.plan.per_file.get(base, (None, None)),
        (ctx.plan.esiid, ctx.plan.meter),
        (settings.esiid_default, settings.meter_default),
    ]
    if looks_armored(data):  # content decides, not the name
        return _process_delivery(ctx, item, result, data, defaults)
    who = attribute(item.path, defaults, head=data[:HEAD_BYTES])
    result.esiid = normalize_esiid(esiid) or who.esiid
    result.meter = meter or who.meter
    if result.esiid is None:
        result.outcome = NO_ESIID
        result.reason = "no ESIID in the name, the content, a request or ESIID_DEFAULT"
        return result
    if ctx.check:
        result.outcome = WOULD_POST
        return result
    _post_and_record(ctx, result, item.path, data, item.mtime, item.rel)
    return result


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
        ctx.session = _new_session()
    ledger, digest = ctx.ledger, result.sha256
    extra = None
    if delivery is not None:
        extra = {"via": "pgp", "member": delivery.member, "csv_sha256": delivery.csv_sha256}
    answer = inline_post.post_file(
        ctx.session,
        ctx.settings,
        path,
        esiid=result.esiid,
        meter=result.meter or ctx.settings.meter_default,
        data=data,
        mtime=mtime,
    )
    result.app_id = answer.app_id
    if answer.outcome in (inline_post.POSTED, inline_post.DUPLICATE):
        duplicate = answer.outcome == inline_post.DUPLICATE
        if delivery is not None and not ledger.is_posted(delivery.csv_sha256):
            # The same interval CSV arriving later in plain text is then a no-op.
            ledger.record_posted(
                delivery.csv_sha256,
                f"{rel}!{delivery.member}",
                answer.app_id,
                duplicate,
                {"via": "pgp", "delivery_sha256": digest},
            )
        ledger.record_posted(digest, rel, answer.app_id, duplicate, extra)
        result.outcome = POSTED if answer.outcome == inline_post.POSTED else DUPLICATE
    elif answer.outcome == inline_post.REJECTED:
        ledger.record_outcome(digest, REJECTED, answer.reason, rel, extra)
        result.outcome, result.reason = REJECTED, answer.reason
    elif answer.outcome == inline_post.TOO_LARGE:
        ledger.record_outcome(digest, TOO_LARGE, answer.reason, rel, extra)
        result.outcome, result.reason = TOO_LARGE, answer.reason
    elif answer.outcome == inline_post.FATAL:
        result.outcome, result.reason = "fatal", answer.reason
    else:
        result.outcome = FAILED
        result.reason = f"{answer.reason} (after {answer.attempts} attempts)"


def _process_delivery(
    ctx: PostContext,
    item: InboxFile,
    result: FileResult,
    data: bytes,
    defaults: list[tuple[str | None, str | None]],
) -> FileResult:
    """A PGP-armored delivery: decrypt, take the interval CSV out of the zip, post that.

    ESIID: operator override, then the ``.asc`` name, the zip member's name, the CSV's ESIID
    column, then the defaults. Meter likewise (``M<digits>`` in a name, then the defaults).
    Errors that are the file's (wrong key, corrupt armor, not a zip, no CSV, over the caps) mark
    the ``.asc`` rejected with ``pgp:<code>: <reason>``; trouble on our side (gpg missing or
    timing out, a locked key) leaves it for the next pass. Check mode decrypts nothing: it reports
    ``would-post`` with what the ``.asc`` name and the defaults say. The plaintext exists only
    inside the ``with`` block (a private directory under ``SMT_PGP_TMPDIR``).
    """
    ledger, digest = ctx.ledger, result.sha256
    assert digest is not None
    override_esiid, override_meter = defaults[0]
    name_esiid = esiid_from_name(item.path.name)
    name_meter = meter_from_name(item.path.name)
    if ctx.check:
        fallback = attribute(item.path, defaults[1:], head=b"")
        result.esiid = override_esiid or name_esiid or fallback.esiid
        result.meter = override_meter or name_meter or fallback.meter
        result.outcome = WOULD_POST
        result.reason = "pgp delivery: not decrypted in check mode"
        return result
    try:
        with ctx.pgp.extract(item.path, armored=data) as x:
            result.member = x.member
            try:
                csv = x.path.read_bytes()
            except OSError as exc:  # the extracted CSV vanished under us (tmp cleaner): retry
                result.outcome, result.reason = FAILED, f"pgp:io: {exc.strerror or exc}"
                return result
            who = attribute(x.path, defaults[1:], head=csv[:HEAD_BYTES])
            result.esiid = override_esiid or name_esiid or esiid_from_name(x.member) or who.esiid
            result.meter = override_meter or name_meter or meter_from_name(x.member) or who.meter
            if result.esiid is None:
                result.outcome = NO_ESIID
                result.reason = (
                    f"no ESIID in the .asc name, member {x.member!r}, its content, a request "
                    "or ESIID_DEFAULT"
                )
                return result
            _post_and_record(ctx, result, x.path, csv, item.mtime, item.rel, delivery=x)
    except DeliveryError as exc:
        reason = f"pgp:{exc.code}: {exc.reason}"
        status = FAILED if exc.retryable else REJECTED
        # FAILED is remembered only for `status`; process_file skips only rejected/too-large.
        ledger.record_outcome(digest, status, reason, item.rel, {"via": "pgp", "code": exc.code})
        result.outcome, result.reason = status, reason
    except ConfigError as exc:  # SMT_GNUPG_PASSPHRASE_FILE unreadable: ours to fix, retry
        result.outcome, result.reason = FAILED, f"pgp:config: {exc}"
    # A LedgerError (the append after a 200) propagates to post_files, as for any file.
    return result


def post_files(
    ctx: PostContext,
    items: list[InboxFile],
    result: PassResult,
    *,
    force: bool = False,
    esiid: str | None = None,
    meter: str | None = None,
) -> None:
    """Run :func:`process_file` over ``items``; stop at the first 401/503, and at the first
    post the ledger cannot record (a full disk: every further post would be unrecorded too)."""
    for index, item in enumerate(items):
        try:
            r = process_file(ctx, item, force=force, esiid=esiid, meter=meter)
        except LedgerError as exc:  # only the append after a 200 writes the ledger here
            digest = ctx.ledger.cached_digest(item.rel, item.size, item.mtime_ns)
            r = FileResult(item.rel, UNRECORDED, digest, reason=str(exc), size=item.size)
            log.error(
                "stopping the pass: %s was accepted by the app (sha256=%s) but cannot be "
                "recorded: %s; the next pass posts it again and records the app's duplicate answer",
                item.rel,
                digest,
                exc,
            )
            result.files.append(r)
            for rest in items[index + 1 :]:
                result.files.append(FileResult(rest.rel, NOT_ATTEMPTED, size=rest.size))
            break
        if r.outcome == "fatal":
            result.fatal = f"{r.path}: {r.reason} — check ADMIN_TOKEN / the app's configuration"
            log.error("stopping the pass: %s", result.fatal)
            r.outcome = NOT_ATTEMPTED
            result.files.append(r)
            for rest in items[index + 1 :]:
                result.files.append(FileResult(rest.rel, NOT_ATTEMPTED, size=rest.size))
            break
        _log_result(r)
        result.files.append(r)
        ctx.ledger.maybe_save()


def check_state_dir(state_file: Path) -> None:
    """Fail before any network traffic if the ledger cannot be written (exit 2): a POST the
    app accepted but we cannot record would be re-posted on every pass."""
    parent = Path(state_file).parent
    if not parent.is_dir():
        raise ConfigError(f"STATE_FILE={state_file}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (
        Path(state_file).exists() and not os.access(state_file, os.W_OK)
    ):
        raise ConfigError(f"STATE_FILE={state_file}: not writable by uid {os.getuid()}")


def _new_session() -> Any:
    import requests

    session = requests.Session()
    session.headers["user-agent"] = "smt-droplet"
    return session


def post_pending(
    settings: PostSettings,
    *,
    paths: list[Path] | None = None,
    force: bool = False,
    check: bool = False,
    plan: RunPlan | None = None,
    result: PassResult | None = None,
    esiid: str | None = None,
    meter: str | None = None,
    pgp: PgpSettings | None = None,
) -> PassResult:
    """Post every unposted inbox file (or just ``paths``); the caller holds the lock.

    ``pgp``: how to decrypt PGP deliveries (default: gpg's own home, ``$TMPDIR``)."""
    result = result or PassResult()
    ledger = Ledger.load(settings.state_file)
    exclude = [settings.state_file, ledger.sidecar, lock_path_for(settings.state_file)]
    if paths:
        items = [inbox_file(p, settings.local_dir) for p in paths]
    else:
        items = scan_inbox(settings.local_dir, settings.include, exclude)
        ledger.prune_hashes({i.rel for i in items})
    ctx = PostContext(
        settings,
        ledger,
        None,  # created on the first POST
        plan or RunPlan(),
        check,
        pgp or PgpSettings(),
    )
    try:
        post_files(ctx, items, result, force=force, esiid=esiid, meter=meter)
    finally:
        if ctx.session is not None:
            ctx.session.close()
        if not check:
            try:
                ledger.save()
            except LedgerError as exc:
                if any(f.outcome == UNRECORDED for f in result.files):
                    log.warning("ledger sidecar not saved either: %s", exc)
                else:
                    result.ledger_error = str(exc)
                    log.error("ledger: %s", exc)
    return result


def _log_sync(mirrored: Any) -> None:
    for f in mirrored.files:
        if f.status == "downloaded":
            log.info("downloaded %s size=%d", f.rel, f.size)
        elif f.status in ("skipped-young", "skipped-growing"):
            log.info("%s %s %s", f.status, f.rel, f.reason)
        elif f.status == "failed":
            log.warning("download-failed %s %s", f.rel, f.reason)
        elif f.status == "would-download":
            log.info("would-download %s size=%d", f.rel, f.size)
    if mirrored.error:
        log.error("sync-failed %s", mirrored.error)


def run_sync(settings: SftpSettings, *, dry_run: bool = False, pkey: Any = None) -> Any:
    """Mirror once and log per file; returns the ``MirrorResult``."""
    from .sftp_mirror import mirror

    mirrored = mirror(settings, dry_run=dry_run, pkey=pkey)
    _log_sync(mirrored)
    return mirrored


def run_pass(env: Mapping[str, str], *, sync: bool = True, use_spool: bool = True) -> PassResult:
    """One complete pass (see the module docstring). Raises ConfigError and LockBusy."""
    settings = PostSettings.from_env(env)
    pgp = PgpSettings.from_env(env)
    sftp_settings: SftpSettings | None = None
    pkey: Any = None
    if sync:
        sftp_settings = SftpSettings.from_env(env)
        from .sftp_mirror import load_private_key

        pkey = load_private_key(sftp_settings.key)
    check_state_dir(settings.state_file)
    queue_dir = spool_dir(env)
    result = PassResult()
    with PassLock(lock_path_for(settings.state_file), wait=settings.lock_wait):
        requests: list[spool.Request] = []
        if use_spool and queue_dir.is_dir():
            try:
                requests = spool.claim(queue_dir)
            except OSError as exc:  # a permissions slip must not stop the timer's pass
                log.error("cannot claim spool requests in %s: %s", queue_dir, exc)
        result.requests = len(requests)
        if requests:
            log.info("serving %d queued request(s)", len(requests))
        try:
            plan = plan_from_requests(requests)
            if sftp_settings is not None:
                from .sftp_mirror import HostKeyError

                try:
                    result.sync = run_sync(sftp_settings, pkey=pkey)
                    result.sync_error = result.sync.error
                except HostKeyError as exc:
                    result.fatal = str(exc)
                    log.error("sync refused: %s", exc)
            if not result.fatal:
                post_pending(settings, plan=plan, result=result, pgp=pgp)
        finally:
            log.info("%s", result.summary_line())
            if requests:
                try:
                    spool.finish(queue_dir, requests)
                except OSError as exc:
                    log.error("cannot remove served spool requests: %s", exc)
            if queue_dir.is_dir():
                spool.write_last_result(queue_dir, result.to_dict())
    return result


# -- helpers for the Ansible modules (library/) ------------------------------------------------


def module_env(params: Mapping[str, Any], option_env: Mapping[str, str]) -> dict[str, str]:
    """The environment a module runs with: its ``env_file`` (if any), then its explicit options
    (lower-case environment names) on top. The controller's environment is never used."""
    from .envfile import read_env_file

    env: dict[str, str] = {}
    if params.get("env_file"):
        env.update(read_env_file(params["env_file"]))
    for option, name in option_env.items():
        value = params.get(option)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        env[name] = str(value)
    return env


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def module_log_capture() -> tuple[list[str], logging.Handler]:
    """Collect the package's INFO+ log lines into a list (returned as a module's ``log``)."""
    lines: list[str] = []
    handler = _ListHandler(lines)
    root = logging.getLogger("smt_droplet")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return lines, handler


# -- commands (cli.py dispatches here) -------------------------------------------------------


def run_ingest_command(env: Mapping[str, str], args: argparse.Namespace) -> int:
    try:
        result = run_pass(
            env, sync=not getattr(args, "no_sync", False), use_spool=not args.no_spool
        )
    except LockBusy as exc:
        log.info("%s; not starting", exc)
        return EXIT_OK
    except LedgerError as exc:
        log.error("ledger: %s", exc)
        return EXIT_RETRY
    return result.exit_code


def run_sync_command(env: Mapping[str, str], args: argparse.Namespace) -> int:
    from .sftp_mirror import HostKeyError

    sftp_settings = SftpSettings.from_env(env)
    state_file = _state_file(env)
    try:
        with PassLock(lock_path_for(state_file), wait=_lock_wait(env)):
            mirrored = run_sync(sftp_settings)
    except LockBusy as exc:
        log.info("%s; not starting", exc)
        return EXIT_OK
    except HostKeyError as exc:
        log.error("sync refused: %s", exc)
        return EXIT_CONFIG
    log.info(
        "summary downloaded=%d unchanged=%d skipped=%d failed=%d",
        len(mirrored.downloaded),
        mirrored.count("unchanged"),
        mirrored.count("skipped-young") + mirrored.count("skipped-growing"),
        mirrored.count("failed"),
    )
    return EXIT_RETRY if mirrored.failed else EXIT_OK


def _local_dir(env: Mapping[str, str]) -> Path:
    value = (env.get("SMT_LOCAL_DIR") or "").strip()
    if not value:
        raise ConfigError("SMT_LOCAL_DIR is not set")
    return Path(value)


def _state_file(env: Mapping[str, str]) -> Path:
    value = (env.get("STATE_FILE") or "").strip()
    return Path(value) if value else _local_dir(env) / LEDGER_BASENAME


def _lock_wait(env: Mapping[str, str]) -> float:
    raw = (env.get("SMT_LOCK_WAIT") or "").strip()
    try:
        return float(raw) if raw else 300.0
    except ValueError:
        raise ConfigError(f"SMT_LOCK_WAIT={raw!r} is not a number") from None


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


def inbox_status(local_dir: Path, state_file: Path, include: tuple[str, ...]) -> dict[str, Any]:
    """Per-file state from the ledger and the inbox (hashes cached like a pass does)."""
    ledger = Ledger.load(state_file)
    exclude = [state_file, ledger.sidecar, lock_path_for(state_file)]
    rows: list[FileStatus] = []
    seen: set[str] = set()
    for item in scan_inbox(local_dir, include, exclude):
        digest = ledger.cached_digest(item.rel, item.size, item.mtime_ns)
        if digest is None:
            try:
                digest, _ = file_digest(ledger, item)
            except OSError:
                continue
        seen.add(digest)
        app = ledger.apps.get(digest) or {}
        previous = ledger.outcome(digest)
        if ledger.is_posted(digest):
            state, reason, info = "posted", "", app
        elif previous is not None:
            state, reason = previous.status, previous.reason
            info = ledger.outcomes.get(digest) or {}
        else:
            state, reason, info = "pending", "", {}
        row = FileStatus(item.rel, state, digest, item.size, reason, app.get("id"))
        if info.get("via") == "pgp":
            row.via = "pgp"
            row.member = _str_or_none(info.get("member"))
            row.csv_sha256 = _str_or_none(info.get("csv_sha256"))
        rows.append(row)
    try:
        ledger.save()
    except LedgerError as exc:
        log.debug("hash cache not saved: %s", exc)
    counts = Counter(r.state for r in rows)
    return {
        "inbox": str(local_dir),
        "state_file": str(state_file),
        "ledger_entries": len(ledger.posted),
        "ledger_entries_not_in_inbox": len(ledger.posted - seen),
        "counts": dict(counts),
        "files": [asdict(r) for r in rows],
    }


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def run_status_command(env: Mapping[str, str], args: argparse.Namespace) -> int:
    include = split_globs((env.get("SMT_INCLUDE") or "").strip() or None)
    report = inbox_status(_local_dir(env), _state_file(env), include)
    queue_dir = spool_dir(env)
    report["queued_requests"] = spool.depth(queue_dir)
    report["last_ingest"] = spool.read_last_result(queue_dir)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return EXIT_OK
    for row in report["files"]:
        extra = f" {row['reason']}" if row["reason"] else ""
        app = f" id={row['app_id']}" if row["app_id"] else ""
        if row["member"]:
            extra += f" pgp-member={row['member']}"
        print(f"{row['state']:<10} {row['path']} sha256={row['sha256'][:12]}{app}{extra}")
    counts = " ".join(f"{k}={v}" for k, v in sorted(report["counts"].items()))
    print(
        f"ledger={report['ledger_entries']} (not in inbox: "
        f"{report['ledger_entries_not_in_inbox']}) {counts} queued={report['queued_requests']}"
    )
    return EXIT_OK


def run_forget_command(env: Mapping[str, str], args: argparse.Namespace) -> int:
    state_file = _state_file(env)
    check_state_dir(state_file)
    target = args.target.strip()
    if is_digest(target) and not os.path.exists(target):
        digest = target.lower()
    else:
        path = Path(target)
        if not path.is_file():
            log.error("forget: %s is neither a file nor a sha256", target)
            return EXIT_CONFIG
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with PassLock(lock_path_for(state_file), wait=_lock_wait(env)):
            ledger = Ledger.load(state_file)
            known = ledger.is_posted(digest) or ledger.outcome(digest) is not None
            removed = ledger.forget({digest})
            ledger.save()
    except LockBusy as exc:
        log.error("forget: %s; try again when it has finished", exc)
        return EXIT_RETRY
    if not known:
        log.warning("forget: %s was not in the ledger %s", digest, state_file)
    else:
        log.info("forgot %s (%d ledger line(s)); the next pass re-posts it", digest, removed)
    return EXIT_OK


def run_post_command(env: Mapping[str, str], args: argparse.Namespace) -> int:
    settings = PostSettings.from_env(env)
    pgp = PgpSettings.from_env(env)
    path = Path(args.path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if args.esiid and normalize_esiid(args.esiid) is None:
        raise ConfigError(f"--esiid {args.esiid!r} is not 17 digits")
    check_state_dir(settings.state_file)
    try:
        with PassLock(lock_path_for(settings.state_file), wait=settings.lock_wait):
            result = post_pending(
                settings,
                paths=[path],
                force=getattr(args, "force", False),
                esiid=args.esiid,
                meter=args.meter,
                pgp=pgp,
            )
    except LockBusy as exc:
        log.error("post: %s; try again when it has finished", exc)
        return EXIT_RETRY
    for r in result.files:
        if r.outcome == SKIPPED_POSTED:
            log.info("skipped-already-posted %s sha256=%s (use --force)", r.path, r.sha256)
        elif r.outcome in (SKIPPED_REJECTED, SKIPPED_TOO_LARGE):
            log.info("%s %s %s (use --force)", r.outcome, r.path, r.reason)
    log.info("%s", result.summary_line())
    return result.exit_code
