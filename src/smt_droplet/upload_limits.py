"""Who is uploading and how much they may: the upload server's identity and rate limits.

Identity comes only from something the server verifies (form fields and headers no longer
choose it):

* a signed upload ticket in ``x-smt-upload-ticket`` (:mod:`smt_droplet.tickets`, minted by the
  web app): role, account and the largest file it allows;
* the static ``SMT_UPLOAD_TOKEN`` (admin scripts): role ``admin``, account ``token``;
* neither, in anonymous mode (no token configured): ``SMT_UPLOAD_DEFAULT_ROLE`` keyed by the
  client address.

The rate limit (persistent, :mod:`smt_droplet.ratelimit`) is keyed ``role:account`` (or
``role:ip:<address>``) and checked before the body is read → 429 with ``Retry-After`` and
``resetAt``. On top, every client address has ``SMT_UPLOAD_CLIENT_DAILY_LIMIT`` uploads a day,
whoever it claims to be. A reservation counts once the body has been received (stored or
duplicate); one rejected for size, type or a broken body is given back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .config import UploadSettings
from .httpserver import Reject, client_address, json_error
from .outcomes import iso_utc
from .ratelimit import Decision, RateLimiter, RateLimitError
from .tickets import TicketError, verify

TOKEN_HEADER = "x-smt-upload-token"  # noqa: S105 - a header name
TICKET_HEADER = "x-smt-upload-ticket"
CLIENT_WINDOW = 24 * 3600.0


@dataclass(frozen=True)
class Identity:
    role: str
    account: str  # "" for an anonymous caller (keyed by address)
    max_bytes: int | None = None  # a ticket's own cap on the file


@dataclass
class Reservation:
    """One request's places in its budgets (``counted`` once the upload is kept)."""

    identity: Identity | None = None
    decision: Decision | None = None
    client: Decision | None = None
    counted: bool = False

    def rate_fields(self) -> dict[str, Any]:
        """What every successful answer tells the caller about its budget."""
        d, who = self.decision, self.identity
        assert d is not None and who is not None
        return {
            "role": who.role,
            "accountKey": who.account or None,
            "limit": d.limit,
            "remaining": d.remaining,
            "resetAt": iso_utc(d.reset_at),
        }


class UploadLimits:
    """Verified identity, and the limiter's reservations for it."""

    def __init__(self, settings: UploadSettings, limiter: RateLimiter) -> None:
        self.settings = settings
        self.limiter = limiter

    def authenticates(self, request: web.Request) -> bool:
        """Whether the request carries a ticket (verified in :meth:`identity`)."""
        return TICKET_HEADER in request.headers

    def identity(self, request: web.Request) -> Identity:
        raw = request.headers.get(TICKET_HEADER)
        if raw is not None:
            try:
                ticket = verify(raw.strip(), self.settings.ticket_secrets)
            except TicketError as exc:
                raise Reject(json_error(request, 401, "bad_ticket", str(exc))) from None
            return Identity(ticket.role, ticket.account, ticket.max_bytes)
        if self.settings.token is not None:  # the precheck verified it
            return Identity("admin", "token")
        return Identity(self.settings.default_role, "")

    def reserve(self, request: web.Request, held: Reservation) -> None:
        """Take a slot in the caller's budget and in its address's daily budget; 429 if spent."""
        who = self.identity(request)
        held.identity = who
        decision = self.limiter.reserve(self._key(request, who), *self._limits(who.role))
        if not decision.allowed:
            raise self._limited(request, who, decision)
        held.decision = decision
        client = self.limiter.reserve(
            self._client_key(request), self.settings.client_daily_limit, CLIENT_WINDOW
        )
        if not client.allowed:
            raise self._client_limited(request, client)
        held.client = client

    def peek(self, request: web.Request) -> None:
        """For ``Expect: 100-continue``: refuse a spent budget before the body is sent."""
        who = self.identity(request)
        decision = self.limiter.peek(self._key(request, who), *self._limits(who.role))
        if not decision.allowed:
            raise self._limited(request, who, decision)
        client = self.limiter.peek(
            self._client_key(request), self.settings.client_daily_limit, CLIENT_WINDOW
        )
        if not client.allowed:
            raise self._client_limited(request, client)

    def release_unless_counted(self, held: Reservation) -> None:
        if held.counted:
            return
        for decision in (held.decision, held.client):
            if decision is not None:
                with contextlib.suppress(RateLimitError):
                    self.limiter.release(decision.reservation)

    def _key(self, request: web.Request, who: Identity) -> str:
        if who.account:
            return f"{who.role}:{who.account}"
        return f"{who.role}:ip:{client_address(request)}"

    def _client_key(self, request: web.Request) -> str:
        return f"client:{client_address(request)}"

    def _limits(self, role: str) -> tuple[int, float]:
        if role == "admin":
            return self.settings.admin_limit, self.settings.admin_window
        return self.settings.customer_limit, self.settings.customer_window

    def _limited(self, request: web.Request, who: Identity, decision: Decision) -> Reject:
        period = "24-hour" if who.role == "admin" else "30-day"
        return Reject(
            json_error(
                request,
                429,
                "rate_limited",
                f"{who.role.capitalize()} upload limit reached for the current {period} window",
                headers={"Retry-After": str(decision.retry_after)},
                role=who.role,
                accountKey=who.account or None,
                limit=decision.limit,
                remaining=0,
                resetAt=iso_utc(decision.reset_at),
            )
        )

    def _client_limited(self, request: web.Request, decision: Decision) -> Reject:
        return Reject(
            json_error(
                request,
                429,
                "client_rate_limited",
                "upload limit for this client address reached for the day",
                headers={"Retry-After": str(decision.retry_after)},
                limit=decision.limit,
                remaining=0,
                resetAt=iso_utc(decision.reset_at),
            )
        )
