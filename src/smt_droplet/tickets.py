"""Signed upload tickets: the upload server's identity of a caller, minted by the web app.

The web app knows who its user is; the droplet does not. So the app mints a short-lived ticket
— like a presigned upload URL — and the browser (or script) sends it in ``x-smt-upload-ticket``::

    v1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, "v1." + base64url(payload)))>

    payload: {"role": "customer" | "admin", "account": "<the app's account id>",
              "exp": <Unix seconds>, "maxBytes": <largest file this ticket may upload>}

The secret is shared with the app (``SMT_UPLOAD_TICKET_SECRET``); during a rotation the
previous one (``SMT_UPLOAD_TICKET_SECRET_PREVIOUS``) is accepted too. The role and the account —
and so the rate-limit budget — come only from a ticket the server verified: form fields and
headers can no longer choose them. :func:`mint` is what the app does (and the tests).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("admin", "customer")
MAX_TICKET = 2048
MAX_LIFETIME = 24 * 3600  # a ticket valid for longer than a day is refused


class TicketError(ValueError):
    """Why a ticket is refused (safe to return: it names no secret)."""


@dataclass(frozen=True)
class Ticket:
    role: str
    account: str
    expires_at: int
    max_bytes: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed: str) -> str:
    return _b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def mint(secret: str, role: str, account: str, expires_at: int, max_bytes: int) -> str:
    """A ticket for ``account`` (what the web app does when its user opens the upload form)."""
    payload = {"role": role, "account": account, "exp": int(expires_at), "maxBytes": max_bytes}
    body = "v1." + _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_mac(secret, body)}"


def verify(raw: str, secrets: Sequence[str], now: float | None = None) -> Ticket:
    """The ticket's claims, if one of ``secrets`` signed it and it has not expired."""
    now = time.time() if now is None else now
    if not secrets:
        raise TicketError("this server accepts no upload tickets")
    if len(raw) > MAX_TICKET or raw.count(".") != 2 or not raw.startswith("v1."):
        raise TicketError("malformed ticket")
    body, _, mac = raw.rpartition(".")
    if not any(hmac.compare_digest(mac.encode(), _mac(s, body).encode()) for s in secrets):
        raise TicketError("ticket signature does not verify")
    try:
        claims = json.loads(_unb64(body[3:]))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TicketError("malformed ticket payload") from None
    return _claims(claims, now)


def _claims(claims: object, now: float) -> Ticket:
    if not isinstance(claims, dict):
        raise TicketError("malformed ticket payload")
    role, account = claims.get("role"), claims.get("account")
    exp, max_bytes = claims.get("exp"), claims.get("maxBytes")
    if role not in ROLES:
        raise TicketError("ticket role must be admin or customer")
    if not isinstance(account, str) or not account or len(account) > 128:
        raise TicketError("ticket account must be a non-empty string")
    if not account.isprintable():
        raise TicketError("ticket account is not printable")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise TicketError("ticket exp must be Unix seconds")
    if exp < now:
        raise TicketError("ticket expired")
    if exp > now + MAX_LIFETIME:
        raise TicketError("ticket valid for more than a day")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise TicketError("ticket maxBytes must be a positive integer")
    return Ticket(str(role), account, exp, max_bytes)
