"""Who is uploading and how much they may: the upload server's identity and rate limits.

The rate limit (persistent, :mod:`smt_droplet.ratelimit`) is keyed ``role:accountKey`` (the
client address when there is no account key): from the ``x-smt-upload-role`` /
``x-smt-upload-account-key`` headers before the body; otherwise from the ``role`` /
``accountKey`` form fields that precede the ``file`` part, before the file's first byte → 429
with ``Retry-After`` and ``resetAt``. Fields that arrive after the file are honoured too, before
the file is stored. A reservation counts once the body has been received (stored or duplicate);
one rejected for size, type or a broken body is given back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .config import UPLOAD_ROLES, UploadSettings
from .httpserver import Reject, json_error
from .ratelimit import Decision, RateLimiter, RateLimitError

ROLE_HEADER = "x-smt-upload-role"
ACCOUNT_HEADER = "x-smt-upload-account-key"
MAX_ACCOUNT_KEY = 128


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Reservation:
    """One request's place in its budget (``counted`` once the upload is kept)."""

    decision: Decision | None = None
    counted: bool = False
    role: str = ""
    account: str = ""

    def rate_fields(self) -> dict[str, Any]:
        """What every successful answer tells the caller about its budget."""
        d = self.decision
        assert d is not None
        return {
            "role": self.role,
            "accountKey": self.account or None,
            "limit": d.limit,
            "remaining": d.remaining,
            "resetAt": iso_utc(d.reset_at),
        }


def identity_in_headers(request: web.Request) -> bool:
    return bool(request.headers.get(ROLE_HEADER) or request.headers.get(ACCOUNT_HEADER))


class UploadLimits:
    """Identity from the request, and the limiter's reservations for it."""

    def __init__(self, settings: UploadSettings, limiter: RateLimiter) -> None:
        self.settings = settings
        self.limiter = limiter

    def identity(self, request: web.Request, fields: Mapping[str, str]) -> tuple[str, str]:
        """(role, account) from the headers, else the form fields, else the default role."""
        role = (
            (request.headers.get(ROLE_HEADER) or fields.get("role") or self.settings.default_role)
            .strip()
            .lower()
        )
        account = (request.headers.get(ACCOUNT_HEADER) or fields.get("accountKey") or "").strip()
        if role not in UPLOAD_ROLES:
            raise Reject(json_error(request, 400, "bad_role", "role must be admin or customer"))
        if len(account) > MAX_ACCOUNT_KEY or not account.isprintable():
            raise Reject(
                json_error(request, 400, "bad_account_key", "accountKey is too long or unprintable")
            )
        return role, account

    def reserve(self, request: web.Request, fields: Mapping[str, str], held: Reservation) -> None:
        """Take (or keep) a slot for the identity the request names now; 429 when spent."""
        role, account = self.identity(request, fields)
        key = self._key(request, role, account)
        if held.decision is not None:
            if held.decision.key == key:
                return
            self.limiter.release(held.decision.reservation)
            held.decision = None
        decision = self.limiter.reserve(key, *self._limits(role))
        held.role, held.account = role, account
        if not decision.allowed:
            raise self._limited(request, role, account, decision)
        held.decision = decision

    def peek(self, request: web.Request) -> None:
        """For ``Expect: 100-continue`` with identity headers: refuse a spent budget early."""
        role, account = self.identity(request, {})
        decision = self.limiter.peek(self._key(request, role, account), *self._limits(role))
        if not decision.allowed:
            raise self._limited(request, role, account, decision)

    def release_unless_counted(self, held: Reservation) -> None:
        if held.decision is not None and not held.counted:
            with contextlib.suppress(RateLimitError):
                self.limiter.release(held.decision.reservation)

    def _key(self, request: web.Request, role: str, account: str) -> str:
        return f"{role}:{account}" if account else f"{role}:ip:{request.remote or 'unknown'}"

    def _limits(self, role: str) -> tuple[int, float]:
        if role == "admin":
            return self.settings.admin_limit, self.settings.admin_window
        return self.settings.customer_limit, self.settings.customer_window

    def _limited(self, request: web.Request, role: str, account: str, decision: Decision) -> Reject:
        period = "24-hour" if role == "admin" else "30-day"
        return Reject(
            json_error(
                request,
                429,
                "rate_limited",
                f"{role.capitalize()} upload limit reached for the current {period} window",
                headers={"Retry-After": str(decision.retry_after)},
                role=role,
                accountKey=account or None,
                limit=decision.limit,
                remaining=0,
                resetAt=iso_utc(decision.reset_at),
            )
        )
