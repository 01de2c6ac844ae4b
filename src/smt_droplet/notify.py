"""Alerts without a monitoring stack: ``smt-droplet notify failure UNIT`` and ``notify check``.

``failure UNIT`` is what the units' ``OnFailure=smt-notify@%n.service`` runs: the ingest pass or
a server failed. ``check`` runs on a timer (``smt-notify-check.timer``) and catches what never
runs ``OnFailure=``: a disabled timer, a hung pass, an expired key (no successful pass for
``SMT_STALE_AFTER``; :func:`smt_droplet.passrecord.verdict`, the same rule as ``/health``), and
files that need an operator. When the trouble is over it says so once.

One message is one JSON POST to ``SMT_NOTIFY_URL`` in a shape Slack (``text``), Discord
(``content``) and ntfy (``topic``/``title``/``message``, posted to the server's root) all accept,
or a mail through the local ``sendmail -t`` (``SMT_NOTIFY_SENDMAIL``). Messages are built only
from this package's own words (unit names, outcomes, counts, file names): never a setting's
value, a header or a log line. The same alert (its key) is not sent again within
``SMT_NOTIFY_REPEAT`` seconds; what was sent when lives in ``SMT_NOTIFY_STATE``.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from email.message import EmailMessage
from typing import Any

from . import durable, spool
from .config import ConfigError, NotifySettings
from .landing import NOT_LANDED
from .logsafety import visible
from .outcomes import iso_utc
from .passrecord import verdict

log = logging.getLogger("smt_droplet.notify")

RECOVERED = "recovered"


class NotifyError(Exception):
    """The message could not be delivered (the next failure or check tries again)."""


def payload(title: str, text: str, topic: str | None) -> dict[str, Any]:
    """One body for Slack, Discord and ntfy (each ignores the others' fields).

    What a file name or an app's message brings stays plain text: control characters escaped,
    Slack's markup (``<!channel>``, ``<@U1>``, links) written as entities, and Discord told to
    ping nobody (``allowed_mentions``)."""
    title, text = visible(title, newlines=False), visible(text)
    slack = f"*{_slack_escape(title)}*\n{_slack_escape(text)}"
    body: dict[str, Any] = {"text": slack, "content": f"**{title}**\n{text}"}
    body.update(title=title, message=text, allowed_mentions={"parse": []})
    if topic:
        body["topic"] = topic
    return body


def _slack_escape(text: str) -> str:
    """Slack's three control characters as entities: no mention, channel ping or link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def send(settings: NotifySettings, title: str, text: str) -> None:
    """Deliver one message; raises NotifyError (the URL itself is never in the message)."""
    if settings.url:
        import requests

        try:
            r = requests.post(
                settings.url,
                json=payload(title, text, settings.topic),
                timeout=settings.timeout,
                headers={"user-agent": "smt-droplet-notify"},
            )
        except requests.RequestException as exc:
            raise NotifyError(f"notification URL unreachable: {type(exc).__name__}") from None
        if r.status_code >= 300:
            raise NotifyError(f"notification URL answered HTTP {r.status_code}")
    if settings.mail_to:
        mail = EmailMessage()
        mail["To"] = settings.mail_to
        mail["Subject"] = visible(title, newlines=False)
        mail.set_content(visible(text))
        try:
            subprocess.run(
                ["/usr/sbin/sendmail", "-t", "-oi"],
                input=mail.as_bytes(),
                check=True,
                timeout=settings.timeout,
                capture_output=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise NotifyError(f"sendmail failed: {type(exc).__name__}") from None


class Notifier:
    """Sends alerts by key, at most once per ``repeat`` seconds each."""

    def __init__(self, settings: NotifySettings, now: float | None = None) -> None:
        self.settings = settings
        self.now = time.time() if now is None else now
        self.host = socket.gethostname()
        try:
            raw = json.loads(settings.state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        self.sent: dict[str, float] = {
            k: float(v) for k, v in (raw.get("sent") or {}).items() if isinstance(v, int | float)
        }

    def alert(self, key: str, what: str, text: str) -> bool:
        """Send unless ``key`` was sent within ``repeat``; True when a message went out."""
        last = self.sent.get(key)
        if last is not None and self.now - last < self.settings.repeat:
            log.info("alert %s already sent %.0f s ago; not repeating", key, self.now - last)
            return False
        send(self.settings, f"SMT droplet {self.host}: {what}", text)
        self.sent[key] = self.now
        self._save()
        log.info("alert %s sent", key)
        return True

    def clear(self, prefix: str, what: str, text: str) -> bool:
        """The trouble behind the keys starting with ``prefix`` is over: say so once."""
        keys = [k for k in self.sent if k.startswith(prefix)]
        if not keys:
            return False
        send(self.settings, f"SMT droplet {self.host}: {what}", text)
        for key in keys:
            del self.sent[key]
        self._save()
        log.info("alert %s cleared", prefix)
        return True

    def _save(self) -> None:
        try:
            self.settings.state.parent.mkdir(parents=True, exist_ok=True)
            durable.write_json_atomic(self.settings.state, {"sent": self.sent})
        except OSError as exc:
            log.warning("cannot record sent alerts in %s: %s", self.settings.state, exc)


def describe_last(record: dict[str, Any] | None) -> str:
    if not record:
        return "No ingest pass has left a record yet."
    counts = ", ".join(f"{k}={v}" for k, v in sorted((record.get("counts") or {}).items()))
    parts = [
        f"Last pass: {record.get('finished_at', '?')} by {record.get('trigger', '?')}, "
        f"exit {record.get('exit_code')}" + (f" ({counts})" if counts else "")
    ]
    if record.get("sync_error"):
        parts.append("The SFTP sync failed.")
    if record.get("fatal"):
        parts.append(f"The pass stopped on a configuration error: {record['fatal']}")
    last = record.get("last_success_ts")
    if isinstance(last, int | float):
        parts.append(f"Last success: {iso_utc(last)}.")
    return " ".join(parts)


def on_failure(settings: NotifySettings, unit: str) -> None:
    """``OnFailure=``: a unit failed."""
    notifier = Notifier(settings)
    record = spool.read_last_result(settings.spool_dir)
    detail = describe_last(record) if unit.startswith("smt-ingest") else ""
    text = f"{unit} failed. {detail} Read: journalctl -u {unit} -n 50".replace("  ", " ")
    notifier.alert(f"failure:{unit}", f"{unit} failed", text)


def check(settings: NotifySettings) -> list[str]:
    """The staleness check; returns the keys it alerted on (or cleared)."""
    notifier = Notifier(settings)
    record = spool.read_last_result(settings.spool_dir)
    done: list[str] = []
    reason = verdict(record, settings.stale_after, now=notifier.now)
    if reason:
        if notifier.alert(
            "ingest",
            reason,
            f"{reason}. {describe_last(record)} Read: journalctl -t smt-ingest -n 100",
        ):
            done.append("ingest")
    elif record and notifier.clear("ingest", "ingest is healthy again", describe_last(record)):
        done.append(RECOVERED)
    if record and not reason:
        notifier.clear(
            "failure:smt-ingest", "smt-ingest passes succeed again", describe_last(record)
        )
    files = [f["path"] for f in (record or {}).get("files") or [] if f.get("needs_operator")]
    waiting = int((record or {}).get("needs_operator") or 0)
    if waiting:
        key = f"needs-operator:{waiting}"
        names = ", ".join(files[:10]) + (" ..." if len(files) > 10 else "")
        text = (
            f"{waiting} file(s) need an operator decision{': ' + names if names else ''}. "
            "See `smt-droplet status`; settle each with `post FILE --esiid E`, `forget` or "
            "`ignore FILE --reason TEXT`."
        )
        if notifier.alert(key, f"{waiting} file(s) need an operator", text):
            done.append(key)
    short = [
        f"{f['path']} ({(f.get('landing') or {}).get('detail')})"
        for f in (record or {}).get("files") or []
        if (f.get("landing") or {}).get("verdict") in NOT_LANDED
    ]
    if short:
        key = "not-landed:" + ",".join(sorted(short))[:200]
        text = (
            f"The app did not store all intervals of {len(short)} file(s): "
            + "; ".join(short[:10])
            + ". See `smt-droplet status --landing short,none,mismatch`; once the app is fixed, "
            "`smt-droplet resend --landing short,none --yes`."
        )
        if notifier.alert(key, f"{len(short)} file(s) did not land whole", text):
            done.append(key)
    return done


def run(settings_env: dict[str, str], what: str, unit: str | None) -> int:
    """The ``notify`` command (exit 0 sent or not needed, 1 delivery failed, 2 configuration)."""
    try:
        settings = NotifySettings.from_env(settings_env)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    try:
        if what == "failure":
            on_failure(settings, unit or "unknown unit")
        else:
            check(settings)
    except NotifyError as exc:
        log.error("alert not delivered: %s", exc)
        return 1
    return 0
