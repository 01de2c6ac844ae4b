"""One ingest pass (:func:`run_pass`) and the posting of inbox files (:func:`post_pending`).

A pass (``smt-droplet ingest``, the timer's and the ``.path`` unit's job)::

    lock (lock.py) → sweep leftovers (sweep.py) → claim spool requests (spool.py) → plan
    (plan.py) → sync (sync.py) → for each inbox file: process (process.py) → remote completion
    (remote_completion.py) → retention and ledger copies (retention.py) → finish spool requests
    → the pass's record (passrecord.py: last result, metrics) → exit code

Exit codes are :class:`~smt_droplet.outcomes.ExitCode` (0 done, 1 retry, 2 configuration).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import actions, progress, spool
from .config import (
    LifecycleSettings,
    PgpSettings,
    PostSettings,
    RecordSettings,
    SftpSettings,
    check_state_dir,
    spool_dir,
)
from .inbox import InboxFile, inbox_file, scan_inbox
from .ledger import Ledger, LedgerError, read_retired, retired_path
from .lock import PassLock, lock_path_for
from .outcomes import NEEDS_OPERATOR, FileResult, Outcome, PassResult
from .passrecord import finish_pass, trigger_of
from .plan import RunPlan, plan_from_requests
from .process import PostContext, log_result, process_file
from .remote_completion import complete_posted
from .retention import COPIES_DIR, run_housekeeping
from .sweep import sweep_stale
from .sync import run_sync

log = logging.getLogger("smt_droplet.ingest")


def run_pass(env: Mapping[str, str], *, sync: bool = True, use_spool: bool = True) -> PassResult:
    """One complete pass (see the module docstring). Raises ConfigError and LockBusy."""
    settings = PostSettings.from_env(env)
    pgp = PgpSettings.from_env(env)
    sftp_settings = SftpSettings.from_env(env) if sync else None
    pkey = _load_key(sftp_settings)
    check_state_dir(settings.state_file)
    queue_dir = spool_dir(env)
    record = RecordSettings.from_env(env)
    lifecycle = LifecycleSettings.from_env(env)
    result = PassResult()
    with PassLock(lock_path_for(settings.state_file), wait=settings.lock_wait):
        sweep_stale(settings.local_dir, queue_dir if use_spool else None)
        requests = _claim(queue_dir) if use_spool else []
        result.requests = len(requests)
        try:
            plan = plan_from_requests(requests)
            result.decisions += _apply_page_actions(settings, requests)
            if sftp_settings is not None:
                started = time.monotonic()
                _sync(sftp_settings, pkey, result)
                result.sync_seconds = time.monotonic() - started
                if result.sync is not None:
                    plan.fresh = {f.rel for f in result.sync.downloaded}
            if not result.fatal:
                post_pending(settings, plan=plan, result=result, pgp=pgp, record_dir=queue_dir)
                _after_posts(sftp_settings, pkey, lifecycle, result)
        finally:
            log.info("%s", result.summary_line())
            _finish(queue_dir, requests)
            finish_pass(record, result, trigger=trigger_of(env))
    return result


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
    record_dir: Path | None = None,
) -> PassResult:
    """Post every unposted inbox file (or just ``paths``); the caller holds the lock.

    ``check``: decide only (no HTTP, no ledger or cache write). ``pgp``: how to decrypt PGP
    deliveries (default: gpg's own home, ``$TMPDIR``). ``record_dir``: the spool, where the last
    pass's record is (a lost ledger is told from a new droplet by it)."""
    result = result or PassResult()
    started = time.monotonic()
    ledger = Ledger.load(settings.state_file)
    exclude = ledger.own_files
    if paths:
        items = [inbox_file(p, settings.local_dir) for p in paths]
    else:
        items = scan_inbox(settings.local_dir, settings.include, exclude)
        ledger.prune_hashes({i.rel for i in items})
    result.inbox_files, result.inbox_bytes = len(items), sum(i.size for i in items)
    if not paths:
        _warn_if_ledger_lost(ledger, settings.local_dir, items, plan, record_dir)
    ctx = PostContext(settings, ledger, None, plan or RunPlan(), check, pgp or PgpSettings())
    try:
        _post_files(ctx, items, result, force=force, esiid=esiid, meter=meter)
    finally:
        if ctx.session is not None:
            ctx.session.close()
        if not check:
            _save_ledger(ledger, result)
        result.inbox_needs_operator = len(ledger.needing_operator(NEEDS_OPERATOR))
        result.inbox_waiting = len(ledger.needing_operator(frozenset({Outcome.WAITING})))
        result.post_seconds = time.monotonic() - started
    return result


# -- the steps ------------------------------------------------------------------------------


def _warn_if_ledger_lost(
    ledger: Ledger,
    inbox: Path,
    items: list[InboxFile],
    plan: RunPlan | None,
    record_dir: Path | None,
) -> None:
    """A missing ledger beside files that were in the inbox before this pass, on a droplet that
    has posted before: say so loudly (every one of them is posted again; the app answers
    ``duplicate`` for what it has). A new droplet's first files are no lost ledger, whichever
    process downloaded them (``ingest-now.yml`` syncs and posts in two)."""
    if ledger.state_file.exists() or ledger.sidecar.exists():
        return
    if not _posted_before(ledger, record_dir):
        return
    arrived_now = set() if plan is None else plan.fresh | set(plan.per_file)  # SFTP, uploads
    earlier = [i for i in items if i.rel not in arrived_now]
    if earlier:
        log.warning(
            "the ledger %s does not exist, but the inbox %s already holds %d file(s) from before "
            "this pass: all of them are posted again (the app answers duplicate for those it "
            "has). If the ledger was lost, stop the timer and restore it first",
            ledger.state_file,
            inbox,
            len(earlier),
        )


def _posted_before(ledger: Ledger, record_dir: Path | None) -> bool:
    """Traces a droplet that has posted leaves outside STATE_FILE and its sidecar: the post log,
    the retired files, the ledger's daily copies, the last pass's record."""
    own = (ledger.posts_log, retired_path(ledger.state_file))
    if any(p.exists() for p in own) or (ledger.state_file.parent / COPIES_DIR).is_dir():
        return True
    record = spool.read_last_result(record_dir) if record_dir is not None else None
    counts = (record or {}).get("counts") or {}
    return bool(counts.get(Outcome.POSTED) or counts.get(Outcome.DUPLICATE))


def _load_key(sftp_settings: SftpSettings | None) -> Any:
    """The SFTP key, loaded before the lock and any traffic (a bad key is exit 2)."""
    if sftp_settings is None:
        return None
    from .sftp_mirror import load_private_key

    return load_private_key(sftp_settings.key)


def _claim(queue_dir: Path) -> list[spool.Request]:
    if not queue_dir.is_dir():
        return []
    try:
        requests = spool.claim(queue_dir)
    except OSError as exc:  # a permissions slip must not stop the timer's pass
        log.error("cannot claim spool requests in %s: %s", queue_dir, exc)
        return []
    if requests:
        log.info("serving %d queued request(s)", len(requests))
    return requests


def _apply_page_actions(
    settings: PostSettings, requests: list[spool.Request]
) -> list[dict[str, str]]:
    """The operator page's forget/ignore decisions (see :mod:`smt_droplet.actions`); returns
    those carried out (for the pass record)."""
    if not any(r.kind == "page" for r in requests):
        return []
    ledger = Ledger.load(settings.state_file)
    applied = actions.apply_requests(ledger, requests)
    if applied:
        try:
            ledger.save()
        except LedgerError as exc:
            log.error("ledger: the page's decisions are not saved: %s", exc)
            return []
    return applied


def _sync(sftp_settings: SftpSettings, pkey: Any, result: PassResult) -> None:
    from .sftp_mirror import HostKeyError

    try:
        retired = read_retired(sftp_settings.state_file) if sftp_settings.state_file else {}
        result.sync = run_sync(sftp_settings, pkey=pkey, retired=retired)
        result.sync.retired_before = set(retired)
        result.sync_error = result.sync.error
    except HostKeyError as exc:
        result.fatal = str(exc)
        log.error("sync refused: %s", exc)


def _after_posts(
    sftp_settings: SftpSettings | None,
    pkey: Any,
    lifecycle: LifecycleSettings,
    result: PassResult,
) -> None:
    """What follows recorded posts: remote completion, then retention and the ledger's copy."""
    mirrored = result.sync
    if sftp_settings is not None and mirrored is not None:
        done = complete_posted(sftp_settings, pkey, mirrored, lifecycle.state_file)
        result.remote_completed = len(done.completed)
        result.remote_completion_failed = len(done.failed)
    listed = None
    if mirrored is not None and mirrored.listed and not mirrored.error:
        names = {f.rel for f in mirrored.files}
        if mirrored.retired_before - names:  # retired paths SFTP no longer lists
            listed = names
    result.retired = len(run_housekeeping(lifecycle, listed=listed).retired)


def _finish(queue_dir: Path, requests: list[spool.Request]) -> None:
    if requests:
        try:
            spool.finish(queue_dir, requests)
        except OSError as exc:
            log.error("cannot remove served spool requests: %s", exc)


def _post_files(
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
    with progress.bar(len(items), "file", "post") as shown:
        _post_each(ctx, items, result, shown, force=force, esiid=esiid, meter=meter)


def _post_each(
    ctx: PostContext,
    items: list[InboxFile],
    result: PassResult,
    shown: Any,
    *,
    force: bool,
    esiid: str | None,
    meter: str | None,
) -> None:
    for index, item in enumerate(items):
        shown.update(1)
        try:
            r = process_file(ctx, item, force=force, esiid=esiid, meter=meter)
        except LedgerError as exc:  # only the append after a 200 writes the ledger here
            digest = ctx.ledger.cached_digest(item.rel, item.size, item.mtime_ns)
            r = FileResult(item.rel, Outcome.UNRECORDED, digest, reason=str(exc), size=item.size)
            log.error(
                "stopping the pass: %s was accepted by the app (sha256=%s) but cannot be "
                "recorded: %s; the next pass posts it again and records the app's duplicate answer",
                item.rel,
                digest,
                exc,
            )
            _stop(result, r, items[index + 1 :])
            return
        if r.outcome == Outcome.FATAL:
            result.fatal = f"{r.path}: {r.reason}"
            log.error("stopping the pass: %s", result.fatal)
            r.outcome = Outcome.NOT_ATTEMPTED
            _stop(result, r, items[index + 1 :])
            return
        log_result(r)
        result.files.append(r)
        ctx.ledger.maybe_save()


def _stop(result: PassResult, last: FileResult, rest: list[InboxFile]) -> None:
    result.files.append(last)
    result.files.extend(FileResult(i.rel, Outcome.NOT_ATTEMPTED, size=i.size) for i in rest)


def _save_ledger(ledger: Ledger, result: PassResult) -> None:
    try:
        ledger.save(move_post_records=True)  # the caller holds the pass lock
    except LedgerError as exc:
        if any(f.outcome == Outcome.UNRECORDED for f in result.files):
            log.warning("ledger sidecar not saved either: %s", exc)
        else:
            result.ledger_error = str(exc)
            log.error("ledger: %s", exc)
