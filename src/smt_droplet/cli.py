"""``smt-droplet`` — the command line the systemd units, the operator and the tests use.

Exit codes: :class:`smt_droplet.outcomes.ExitCode` (0 done, 1 left to retry, 2 configuration).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import __version__
from .config import DELIVERIES, ConfigError, TargetError
from .envfile import EnvFileError, load_environment
from .logsafety import protect_logging, secrets_in
from .outcomes import ExitCode

log = logging.getLogger("smt_droplet")


def setup_logging(verbose: bool = False) -> None:
    """One line per event; journald adds its own timestamps, a terminal gets ours."""
    under_journal = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(message)s" if under_journal else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=fmt,
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        stream=sys.stderr,
        force=True,
    )
    # Library chatter (paramiko's transport thread, aiohttp's access log) stays out of INFO.
    logging.getLogger("paramiko").setLevel(logging.WARNING)


Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]


def _command(name: str) -> Handler:
    """The handler in ``commands.py`` (imported on use: ``--help`` stays fast)."""

    def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        from .commands import HANDLERS

        return HANDLERS[name](env, args)

    return run


def _cmd_webhook(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .webhook import serve

    return serve(env)


def _cmd_upload(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .upload import serve

    return serve(env)


def _cmd_notify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .notify import run

    return run(dict(env), args.what, args.unit)


BUILD_FILE = "smt_droplet.build"  # written by the role beside the package: <version>+<sha12>


def version_string() -> str:
    """``0.1.0``, plus the installed artifact's build when the role wrote it."""
    try:
        build = (Path(__file__).resolve().parent.parent / BUILD_FILE).read_text().strip()
    except OSError:
        return __version__
    return f"{__version__} (build {build})" if build else __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smt-droplet",
        description="Smart Meter Texas ingest droplet for IntelliWatt.",
        epilog="Settings come from the environment; --env-file PATH (e.g. "
        "/etc/default/intelliwatt-smt) is read on top of it, like systemd's EnvironmentFile=.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version_string()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--env-file",
        metavar="PATH",
        help="read settings from this env file (default: $SMT_ENV_FILE, if set)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, handler: Handler | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler or _command(name))
        return p

    p = add("ingest", "one pass: sync from SFTP, then post every unposted file")
    p.add_argument("--no-sync", action="store_true", help="skip the SFTP sync; post what is local")
    p.add_argument(
        "--no-spool", action="store_true", help="do not consume queued webhook/upload requests"
    )
    p.epilog = (
        "One pass at a time per box: a pass that finds another one running waits up to "
        "SMT_LOCK_WAIT seconds (default 300) for it, then exits 0 saying another pass is running "
        "(queued requests stay queued for the next pass). Exit 0: everything posted or "
        "deliberately skipped; 1: something left to retry; 2: configuration error."
    )
    add("sync", "mirror new files from SFTP into the inbox; post nothing")
    p = add(
        "status",
        "per-file state: arrival, outcome, ESIID, meter, the app's id, the reason and the data "
        "summary; files that need an operator first",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--landing",
        metavar="VERDICTS",
        help="only posted files with these landing verdicts, comma-separated "
        "(exact, short, none, mismatch, unverified, no-verdict)",
    )
    target_help = (
        "a file (as given, or relative to the inbox, as status prints it), its sha256, or a "
        "unique prefix of at least 6 hex digits"
    )
    p = add(
        "forget",
        "drop a file from the ledger (posted, refused or ignored): the next pass handles it again",
    )
    p.add_argument("target", metavar="FILE|SHA256", help=target_help)
    p = add("ignore", "settle a file for good: never posted, shown as ignored in status")
    p.add_argument("target", metavar="FILE|SHA256", help=target_help)
    p.add_argument("--reason", required=True, help="why (kept in the ledger, shown in status)")
    p = add("post", "post one file now (ledger updated, lock held)")
    p.add_argument("path", metavar="FILE|SHA256", help="the CSV to post; " + target_help)
    p.add_argument("--esiid", help="ESIID to attribute the file to (17 digits)")
    p.add_argument("--meter", help="meter id, e.g. M1")
    p.add_argument("--force", action="store_true", help="post even if the ledger has it")
    p.add_argument(
        "--delivery",
        choices=DELIVERIES,
        help="the app's endpoint for this post (default: SMT_DELIVERY, else inline)",
    )
    p = add(
        "resend",
        "send posted files again on purpose (after the app's parser was fixed or its data "
        "purged): list a selection, and with --yes queue it for the next pass",
    )
    p.add_argument(
        "--landing", metavar="VERDICTS", help="landing verdicts, e.g. short,none (see status)"
    )
    p.add_argument("--esiid", help="files posted as this ESIID")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="files with data on or after this day")
    p.add_argument("--until", metavar="YYYY-MM-DD", help="files with data on or before this day")
    p.add_argument("--all", action="store_true", help="every posted file still in the inbox")
    p.add_argument("--yes", action="store_true", help="queue them (without it: only list them)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.epilog = (
        "Criteria combine (all must hold). The next pass posts each file again and records the "
        "app's new answer and landing verdict; on the droplet smt-ingest.path starts it at once. "
        "Files retention took out of the inbox are listed but cannot be sent from here."
    )
    p = add(
        "notify",
        "send an alert: `failure UNIT` (OnFailure=) or `check` (staleness, files that need an "
        "operator; run by smt-notify-check.timer)",
        _cmd_notify,
    )
    p.add_argument("what", choices=["failure", "check"])
    p.add_argument("unit", nargs="?", help="the unit that failed (failure only)")
    p.epilog = (
        "Settings: SMT_NOTIFY_URL (Slack/Discord webhook or ntfy), SMT_NOTIFY_TOPIC, "
        "SMT_NOTIFY_SENDMAIL, SMT_NOTIFY_REPEAT (s, default 21600), SMT_NOTIFY_STATE, "
        "SMT_SPOOL_DIR, SMT_STALE_AFTER. Exit 1 when the alert could not be delivered."
    )
    add("webhook-server", "serve POST /trigger/smt-now (queues an ingest)", _cmd_webhook)
    add("upload-server", "serve POST /upload (stores a CSV, queues an ingest)", _cmd_upload)
    return parser


# Commands that change what the ledger says of a file: their lines also go to the journal under
# the units' identifier (`journalctl -t smt-ingest`), so the journal's last word on a file is
# its real state, whoever settled it from a terminal.
DECISIONS = frozenset({"post", "forget", "ignore", "resend"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command in DECISIONS and "JOURNAL_STREAM" not in os.environ:
        from .ansible_support import journal_handler

        handler = journal_handler()
        if handler is not None:  # on the root logger: protect_logging's filters cover it too
            logging.getLogger().addHandler(handler)
    try:
        env = load_environment(args.env_file or os.environ.get("SMT_ENV_FILE") or None)
        protect_logging(secrets_in(env))  # before anything can log a request or a setting
        return int(args.handler(args, env))
    except TargetError as exc:  # a mistyped name or digest: not the droplet's configuration
        log.error("%s: %s", args.command, exc)
        return ExitCode.CONFIG
    except (ConfigError, EnvFileError) as exc:
        log.error("configuration error: %s", exc)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
