"""Signed webhook calls that cannot be replayed.

Two schemes are verified (HMAC-SHA256, constant-time):

* **Standard Webhooks** (what the web app can produce with a stock library):
  ``webhook-id``, ``webhook-timestamp`` (integer Unix seconds) and ``webhook-signature:
  v1,<base64>`` — several space-separated entries are allowed (secret rotation). The signed
  content is ``<id>.<timestamp>.<raw body>``; a secret written ``whsec_<base64>`` is the
  base64-decoded key, any other secret is used as its UTF-8 bytes.
* the droplet's own scheme: ``x-smt-timestamp: <unix seconds>`` and ``x-smt-signature:
  sha256=<hex HMAC(secret, "<timestamp>." + raw body)>``.

A timestamp must be plain digits (no ``nan``, ``inf``, exponent or sign), at most the window
(at most 5 minutes) old and at most a minute ahead of the server's clock. Every accepted delivery is
remembered for twice the window in a small SQLite file (:class:`ReplayGuard`), keyed by its
``webhook-id`` (or, for the own scheme, its signature), so a captured request is refused when
sent again — also after a restart of the server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .statedb import open_state_db

MAX_FUTURE_SKEW = 60.0  # a sender's clock ahead of ours by more than this is refused
_TIMESTAMP = re.compile(r"[0-9]{1,12}\Z")
_ID = re.compile(r"[\x21-\x7e]{1,256}\Z")  # printable ASCII, no spaces


class SignatureError(Exception):
    """Why a signed call is refused (the text is safe to return: it names no secret)."""


class ReplayStoreError(OSError):
    """The replay memory cannot be opened or written."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The own scheme's ``x-smt-signature`` value: ``sha256=<hex>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64, or plain text)."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def sign_standard(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,<base64 HMAC-SHA256>``."""
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    mac = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def parse_timestamp(raw: str | None, now: float, window: float) -> int:
    """The timestamp as integer seconds, if it is plain digits, at most ``window`` seconds old
    and at most ``min(window, MAX_FUTURE_SKEW)`` seconds ahead of ``now``."""
    value = (raw or "").strip()
    if not _TIMESTAMP.match(value):
        raise SignatureError("timestamp must be integer Unix seconds")
    stamp = int(value)
    if now - stamp > window:
        raise SignatureError("timestamp too old")
    if stamp - now > min(window, MAX_FUTURE_SKEW):
        raise SignatureError("timestamp in the future")
    return stamp


@dataclass(frozen=True)
class Verified:
    """An accepted signed call: the key under which it is remembered."""

    delivery: str
    timestamp: int


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str],
    now: float,
    window: float,
) -> Verified | None:
    """Check whichever scheme the headers carry; ``None`` when they carry no signature."""
    if "webhook-signature" in headers:
        return _verify_standard(headers, body, secrets, now, window)
    if "x-smt-signature" in headers:
        return _verify_own(headers, body, secrets, now, window)
    return None


def _verify_standard(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[str], now: float, window: float
) -> Verified:
    msg_id = headers.get("webhook-id", "").strip()
    if not _ID.match(msg_id):
        raise SignatureError("webhook-id missing or malformed")
    raw_stamp = headers.get("webhook-timestamp", "").strip()
    stamp = parse_timestamp(raw_stamp, now, window)
    given = [p for p in headers.get("webhook-signature", "").split(" ") if p.startswith("v1,")]
    expected = [sign_standard(s, msg_id, raw_stamp, body) for s in secrets]
    if not any(_equal(g, e) for g in given[:8] for e in expected):
        raise SignatureError("no valid v1 signature")
    return Verified(f"id:{msg_id}", stamp)


def _verify_own(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[str], now: float, window: float
) -> Verified:
    raw_stamp = headers.get("x-smt-timestamp", "").strip()
    stamp = parse_timestamp(raw_stamp, now, window)
    given = headers.get("x-smt-signature", "").strip()
    if not any(_equal(given, sign(s, raw_stamp, body)) for s in secrets):
        raise SignatureError("bad signature")
    return Verified(f"sig:{given.lower()}", stamp)


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class ReplayGuard:
    """Deliveries seen within the last ``2 * window`` seconds, in SQLite (survives restarts)."""

    def __init__(self, path: Path, window: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.window = window
        self._clock = clock
        try:
            self._db = open_state_db(
                path,
                0o600,
                "CREATE TABLE IF NOT EXISTS seen (delivery TEXT PRIMARY KEY, at REAL NOT NULL);",
            )
        except (OSError, sqlite3.Error) as exc:
            raise ReplayStoreError(f"replay memory {path}: {exc}") from exc

    def first_time(self, delivery: str) -> bool:
        """Remember ``delivery``; ``False`` if it was already seen (a replay)."""
        now = self._clock()
        try:
            self._db.execute("DELETE FROM seen WHERE at < ?", (now - 2 * self.window,))
            cur = self._db.execute(
                "INSERT OR IGNORE INTO seen (delivery, at) VALUES (?, ?)", (delivery, now)
            )
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"replay memory {self.path}: {exc}") from exc
        return cur.rowcount == 1

    def forget(self, delivery: str) -> None:
        """Drop ``delivery`` again (its request could not be queued: the sender's retry of the
        same delivery must be accepted)."""
        try:
            self._db.execute("DELETE FROM seen WHERE delivery = ?", (delivery,))
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"replay memory {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()
