"""Log lines that can neither leak a secret nor flood the journal.

Three filters, installed once per process by :func:`protect_logging` (``cli.main`` does it as
soon as the settings are known):

* :class:`SecretRedactor`, on every handler of the root logger: any configured secret (the
  values of ``envfile.SECRET_SETTINGS``) is replaced by ``[redacted]`` in the message, its
  arguments and the formatted traceback — whichever library logged it.
* :class:`MalformedRequestSummary`, on aiohttp's server logger: a request the HTTP parser refused
  (a header line with a stray CR, a bad status line...) is logged as one line naming the error
  class, never the raw bytes aiohttp quotes (which may hold a token).
* :class:`ControlEscaper`, on every handler of the root logger: control characters (ESC, CR,
  BEL, ... — everything but newline and tab) in a message are written as ``\\xNN``, so a file
  name, a reason or an app's message cannot move a terminal's cursor or forge a line.
* :class:`FloodGate`, on the library loggers that one client can make talk (aiohttp's server and
  web loggers, asyncio): at most ``burst`` records per ``interval`` seconds each, then one line
  saying how many were suppressed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping

from .envfile import SECRET_SETTINGS

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words
NOISY_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "asyncio")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def visible(text: str, *, newlines: bool = True) -> str:
    """``text`` with its control characters as ``\\xNN`` (tab kept; newlines kept unless
    ``newlines=False``): safe to print to a terminal, a journal line or a chat message."""
    pattern = _CONTROL if newlines else _CONTROL_OR_NEWLINE
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ControlEscaper(logging.Filter):
    """Writes the control characters of a record's message as ``\\xNN`` (see :func:`visible`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = visible(message), None
        return True


def secrets_in(env: Mapping[str, str]) -> list[str]:
    """The configured secrets (stripped, as the settings read them)."""
    found = []
    for name in SECRET_SETTINGS:
        value = (env.get(name) or "").strip()
        if len(value) >= MIN_SECRET_LENGTH:
            found.append(value)
    return found


class SecretRedactor(logging.Filter):
    """Replaces every configured secret in a record (message, arguments, traceback)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len)[::-1]

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self._scrub(message), None
        record.exc_info = None  # the scrubbed exc_text is what the handler prints
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        return True


class MalformedRequestSummary(logging.Filter):
    """aiohttp's "Error handling request" for a request its parser refused → one short line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_parser_error(exc):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
        status = getattr(exc, "code", 400)
        record.msg = "refused a malformed HTTP request from %s: %s (%s)"
        record.args = (peer, type(exc).__name__, status)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def _is_parser_error(exc: BaseException) -> bool:
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - the servers always have aiohttp
        return False
    return isinstance(exc, HttpProcessingError)


class FloodGate(logging.Filter):
    """At most ``burst`` records of one kind (the same format string) per ``interval`` seconds;
    the first one after a quiet spell says how many were dropped."""

    def __init__(
        self, burst: int = 20, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst, self.interval, self._clock = burst, interval, clock
        self._kinds: dict[str, list[float]] = {}  # format string → [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        kind = str(record.msg)[:200]
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.interval:
            dropped = int(state[2]) if state else 0
            if len(self._kinds) > 1000:  # one client cannot grow this without bound either
                self._kinds.clear()
            state = self._kinds[kind] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.getMessage()} ({dropped} similar messages suppressed)"
                record.args = None
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        return True


_installed: list[tuple[logging.Filterer, logging.Filter]] = []


def protect_logging(secrets: Iterable[str]) -> None:
    """Install the filters (again: the previous ones are removed first)."""
    for owner, installed in _installed:
        owner.removeFilter(installed)
    _installed.clear()
    redactor = SecretRedactor(secrets)
    escaper = ControlEscaper()
    for handler in logging.getLogger().handlers:
        for installed in (redactor, escaper):
            handler.addFilter(installed)
            _installed.append((handler, installed))
    server = logging.getLogger("aiohttp.server")
    summary = MalformedRequestSummary()
    server.addFilter(summary)
    _installed.append((server, summary))
    for name in NOISY_LOGGERS:
        gate = FloodGate()
        logging.getLogger(name).addFilter(gate)
        _installed.append((logging.getLogger(name), gate))
