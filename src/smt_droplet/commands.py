"""What each ``smt-droplet`` command does (``cli.py`` parses the arguments and calls these).

Every handler takes the merged environment and the parsed arguments and returns an
:class:`~smt_droplet.outcomes.ExitCode`; a :class:`~smt_droplet.config.ConfigError` raised here
becomes one log line and exit 2 in ``cli.main``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .config import (
    ConfigError,
    InboxSettings,
    PgpSettings,
    PostSettings,
    SftpSettings,
    check_state_dir,
)
from .esiid import normalize_esiid
from .ingest import post_pending, run_pass
from .ledger import Ledger, LedgerError, is_digest
from .lock import LockBusy, PassLock, lock_path_for
from .outcomes import ExitCode, Outcome
from .status import format_report, status_report
from .sync import run_sync

log = logging.getLogger("smt_droplet.ingest")


def run_ingest_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    try:
        result = run_pass(
            env, sync=not getattr(args, "no_sync", False), use_spool=not args.no_spool
        )
    except LockBusy as exc:
        log.info("%s; not starting", exc)
        return ExitCode.OK
    except LedgerError as exc:
        log.error("ledger: %s", exc)
        return ExitCode.RETRY
    return result.exit_code


def run_sync_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    from .sftp_mirror import HostKeyError

    sftp_settings = SftpSettings.from_env(env)
    inbox = InboxSettings.from_env(env)
    try:
        with PassLock(lock_path_for(inbox.state_file), wait=inbox.lock_wait):
            mirrored = run_sync(sftp_settings)
    except LockBusy as exc:
        log.info("%s; not starting", exc)
        return ExitCode.OK
    except HostKeyError as exc:
        log.error("sync refused: %s", exc)
        return ExitCode.CONFIG
    log.info(
        "summary downloaded=%d unchanged=%d skipped=%d failed=%d",
        len(mirrored.downloaded),
        mirrored.count("unchanged"),
        mirrored.count("skipped-young") + mirrored.count("skipped-growing"),
        mirrored.count("failed"),
    )
    return ExitCode.RETRY if mirrored.failed else ExitCode.OK


def run_status_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    report = status_report(InboxSettings.from_env(env))
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in format_report(report)))
    return ExitCode.OK


def run_forget_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    inbox = InboxSettings.from_env(env)
    check_state_dir(inbox.state_file)
    target = args.target.strip()
    if is_digest(target) and not os.path.exists(target):
        digest = target.lower()
    else:
        path = Path(target)
        if not path.is_file():
            log.error("forget: %s is neither a file nor a sha256", target)
            return ExitCode.CONFIG
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with PassLock(lock_path_for(inbox.state_file), wait=inbox.lock_wait):
            ledger = Ledger.load(inbox.state_file)
            known = ledger.is_posted(digest) or ledger.outcome(digest) is not None
            removed = ledger.forget({digest})
            ledger.save()
    except LockBusy as exc:
        log.error("forget: %s; try again when it has finished", exc)
        return ExitCode.RETRY
    if not known:
        log.warning("forget: %s was not in the ledger %s", digest, inbox.state_file)
    else:
        log.info("forgot %s (%d ledger line(s)); the next pass re-posts it", digest, removed)
    return ExitCode.OK


def run_post_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
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
        return ExitCode.RETRY
    for r in result.files:
        if r.outcome == Outcome.SKIPPED_POSTED:
            log.info("skipped-already-posted %s sha256=%s (use --force)", r.path, r.sha256)
        elif r.outcome in (Outcome.SKIPPED_REJECTED, Outcome.SKIPPED_TOO_LARGE):
            log.info("%s %s %s (use --force)", r.outcome, r.path, r.reason)
    log.info("%s", result.summary_line())
    return result.exit_code


# ``smt-droplet <name>`` → its handler (cli.py's parser names the same commands).
HANDLERS = {
    "ingest": run_ingest_command,
    "sync": run_sync_command,
    "status": run_status_command,
    "forget": run_forget_command,
    "post": run_post_command,
}
