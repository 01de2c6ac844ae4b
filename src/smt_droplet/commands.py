"""What each ``smt-droplet`` command does (``cli.py`` parses the arguments and calls these).

Every handler takes the merged environment and the parsed arguments and returns an
:class:`~smt_droplet.outcomes.ExitCode`; a :class:`~smt_droplet.config.ConfigError` raised here
becomes one log line and exit 2 in ``cli.main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import actions, resend
from .config import (
    ConfigError,
    InboxSettings,
    PgpSettings,
    PostSettings,
    RecordSettings,
    SftpSettings,
    TargetError,
    check_state_dir,
)
from .esiid import normalize_esiid
from .ingest import post_pending, run_pass
from .ledger import Ledger, LedgerError, is_digest
from .lock import LockBusy, PassLock, lock_path_for
from .outcomes import SETTLED_STATES, ExitCode, Outcome
from .passrecord import finish_pass
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
    if getattr(args, "landing", None):
        wanted = resend.Selection.parse(landing=args.landing).landing
        report["files"] = [
            row
            for row in report["files"]
            if row["state"] == "posted"
            and ((row.get("landing") or {}).get("verdict") or "no-verdict") in wanted
        ]
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in format_report(report)))
    return ExitCode.OK


@dataclass
class Target:
    """What ``forget``/``ignore``/``post`` were pointed at."""

    digest: str
    path: Path | None  # the file, when it exists (always for ``post``)
    rel: str  # as ``status`` prints it (inbox-relative), or the digest


MIN_PREFIX = 6


def resolve_target(inbox: InboxSettings, ledger: Ledger, target: str) -> Target:
    """A file (as given, or relative to the inbox: what ``status`` prints), a full sha256, or a
    unique prefix of one (at least 6 hex digits) the ledger knows. Raises ConfigError."""
    target = target.strip()
    for candidate in (Path(target), inbox.local_dir / target):
        if candidate.is_file():
            return _file_target(inbox, ledger, candidate)
    lowered = target.lower()
    if len(lowered) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in lowered):
        matches = sorted(d for d in ledger.known_digests() if d.startswith(lowered))
        if len(matches) > 1:
            raise TargetError(f"{target} is ambiguous: {len(matches)} digests start with it")
        if matches or is_digest(lowered):
            digest = matches[0] if matches else lowered
            rel = ledger.path_of(digest)
            path = inbox.local_dir / rel if rel else None
            if path is not None and not path.is_file():
                path = None
            return Target(digest, path, rel or digest)
    raise TargetError(
        f"{target}: neither a file (as given or under {inbox.local_dir}) nor a digest (or a "
        f"unique prefix of at least {MIN_PREFIX} hex digits) the ledger knows; "
        "`smt-droplet status` lists the files"
    )


def _file_target(inbox: InboxSettings, ledger: Ledger, path: Path) -> Target:
    try:
        rel = str(path.resolve().relative_to(inbox.local_dir.resolve()))
    except ValueError:
        rel = str(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Target(digest, path, rel)


def run_forget_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    inbox = InboxSettings.from_env(env)
    check_state_dir(inbox.state_file)
    try:
        with PassLock(lock_path_for(inbox.state_file), wait=inbox.lock_wait):
            ledger = Ledger.load(inbox.state_file)
            target = resolve_target(inbox, ledger, args.target)
            actions.forget(ledger, target.digest, target.rel, by=_operator())
            ledger.save()
    except LockBusy as exc:
        log.error("forget: %s; try again when it has finished", exc)
        return ExitCode.RETRY
    return ExitCode.OK


def run_ignore_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    """Settle a file for good: a tombstone in the ledger, never posted, shown as ``ignored``."""
    inbox = InboxSettings.from_env(env)
    if not args.reason.split():
        raise ConfigError("ignore: --reason must say why (it is shown in status)")
    check_state_dir(inbox.state_file)
    try:
        with PassLock(lock_path_for(inbox.state_file), wait=inbox.lock_wait):
            ledger = Ledger.load(inbox.state_file)
            target = resolve_target(inbox, ledger, args.target)
            try:
                actions.ignore(ledger, target.digest, target.rel, args.reason, _operator())
            except actions.ActionError as exc:
                log.error("ignore: %s", exc)
                return ExitCode.CONFIG
            ledger.save()
    except LockBusy as exc:
        log.error("ignore: %s; try again when it has finished", exc)
        return ExitCode.RETRY
    return ExitCode.OK


def _operator() -> str:
    """Who ran the command: the wrapper's ``SMT_OPERATOR`` (the sudo user it was run by), else
    ``SUDO_USER``, else the login."""
    return (
        os.environ.get("SMT_OPERATOR")
        or os.environ.get("SUDO_USER")
        or os.environ.get("USER")
        or str(os.getuid())
    )


def run_resend_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    """List the selection; with ``--yes`` queue it for the next pass."""
    inbox = InboxSettings.from_env(env)
    selection = resend.Selection.parse(
        landing=args.landing,
        esiid=args.esiid,
        since=args.since,
        until=args.until,
        everything=args.all,
    )
    chosen = resend.select(Ledger.load(inbox.state_file), inbox.local_dir, selection)
    queued = 0
    if args.yes and chosen.files:
        queued = resend.queue(inbox.spool_dir, chosen.files, f"resend by {_operator()}")
    if args.json:
        out = {
            "inbox": str(inbox.local_dir),
            "files": chosen.files,
            "not_in_inbox": chosen.gone,
            "queued": queued,
        }
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return ExitCode.OK
    for row in chosen.files:
        print(
            f"{'queued' if queued else 'would resend'} {row['path']} landing={row['landing']} "
            f"esiid={row['esiid'] or '-'} sha256={row['sha256'][:12]} {row['detail']}".rstrip()
        )
    for row in chosen.gone:
        print(f"not in the inbox (retired) {row['path']} landing={row['landing']}: cannot resend")
    if queued:
        print(f"{queued} file(s) queued: the next pass posts them again")
    elif chosen.files:
        print(f"{len(chosen.files)} file(s) selected; nothing sent: add --yes to queue them")
    else:
        print("no posted file in the inbox matches")
    return ExitCode.OK


def run_post_command(env: Mapping[str, str], args: argparse.Namespace) -> ExitCode:
    settings = PostSettings.from_env(env)
    if getattr(args, "delivery", None):
        settings = dataclasses.replace(settings, delivery=args.delivery)
    pgp = PgpSettings.from_env(env)
    if args.esiid and normalize_esiid(args.esiid) is None:
        raise ConfigError(f"--esiid {args.esiid!r} is not 17 digits")
    inbox = InboxSettings.from_env(env)
    target = resolve_target(inbox, Ledger.load(settings.state_file), args.path)
    if target.path is None:
        raise TargetError(f"{args.path}: sha256={target.digest} is not a file in the inbox")
    check_state_dir(settings.state_file)
    try:
        with PassLock(lock_path_for(settings.state_file), wait=settings.lock_wait):
            result = post_pending(
                settings,
                paths=[target.path],
                force=getattr(args, "force", False),
                esiid=args.esiid,
                meter=args.meter,
                pgp=pgp,
            )
    except LockBusy as exc:
        log.error("post: %s; try again when it has finished", exc)
        return ExitCode.RETRY
    log.info("post %s by %s", target.rel, _operator())
    result.decisions.append(
        {"action": "post", "path": target.rel, "sha256": target.digest, "by": _operator()}
    )
    finish_pass(RecordSettings.from_env(env), result, trigger="post")
    for r in result.files:
        if r.outcome == Outcome.SKIPPED_POSTED:
            log.info("skipped-already-posted %s sha256=%s (use --force)", r.path, r.sha256)
        elif r.outcome in SETTLED_STATES.values():
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
    "ignore": run_ignore_command,
    "resend": run_resend_command,
}
