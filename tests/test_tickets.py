"""Signed upload tickets (the web app mints, the upload server verifies)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smt_droplet.tickets import TicketError, mint, verify

SECRET = "current-ticket-secret-0123456789abcdef"
OLD = "previous-ticket-secret-0123456789abcdef"


def test_a_ticket_round_trips_and_the_previous_secret_still_verifies() -> None:
    now = time.time()
    for secret in (SECRET, OLD):
        t = verify(mint(secret, "customer", "acct-7", int(now) + 60, 5000), [SECRET, OLD], now)
        assert (t.role, t.account, t.max_bytes) == ("customer", "acct-7", 5000)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "signature"),
        (lambda t: t.replace("v1.", "v2.", 1), "malformed"),
        (lambda t: t + ".x", "malformed"),
        (lambda t: "", "malformed"),
    ],
)
def test_a_changed_ticket_is_refused(change, reason: str) -> None:
    raw = mint(SECRET, "admin", "ops", int(time.time()) + 60, 10)
    with pytest.raises(TicketError, match=reason):
        verify(change(raw), [SECRET])


def test_claims_are_checked() -> None:
    now = int(time.time())
    bad = [
        (mint(SECRET, "root", "a", now + 60, 10), "role"),
        (mint(SECRET, "admin", "", now + 60, 10), "account"),
        (mint(SECRET, "admin", "a", now - 1, 10), "expired"),
        (mint(SECRET, "admin", "a", now + 2 * 86400, 10), "more than a day"),
        (mint(SECRET, "admin", "a", now + 60, 0), "maxBytes"),
    ]
    for raw, reason in bad:
        with pytest.raises(TicketError, match=reason):
            verify(raw, [SECRET], now)
    with pytest.raises(TicketError, match="accepts no upload tickets"):
        verify(mint(SECRET, "admin", "a", now + 60, 10), [])


@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_never_crashes(raw: str) -> None:
    with pytest.raises(TicketError):
        verify(raw, [SECRET])
