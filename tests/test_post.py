"""post_file against the strict IntelliWatt double: body, outcomes, retries, the size cap."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from smt_droplet.config import PostSettings
from smt_droplet.inline_post import encode_file, post_file
from smt_droplet.outcomes import Outcome
from testbed.intelliwatt_double import IntelliWattDouble

ESIID = "10443720000000099"


@pytest.fixture
def settings(webapp: IntelliWattDouble, inbox: Path) -> PostSettings:
    assert webapp.admin_token
    return PostSettings(
        base_url=webapp.url,
        admin_token=webapp.admin_token,
        local_dir=inbox,
        state_file=inbox / ".posted_sha256",
        retries=3,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        retry_after_max=0.5,
        http_timeout=2.0,
    )


@pytest.fixture
def csv_file(inbox: Path, smt_csv) -> Path:
    return smt_csv.write(inbox, name=f"IntervalMeterUsage_{ESIID}_20250308.csv", esiid=ESIID)


@pytest.fixture
def session() -> requests.Session:
    with requests.Session() as s:
        yield s


def test_body_follows_the_contract(csv_file: Path) -> None:
    data = csv_file.read_bytes()
    enc = encode_file(
        data,
        filename=csv_file.name,
        mtime=1_700_000_000.5,
        esiid=ESIID,
        meter="M1",
        source="adhocusage",
        encoding="base64+gzip",
    )
    body = json.loads(enc.body)
    assert body["mode"] == "inline"
    assert body["encoding"] == "base64+gzip"
    assert gzip.decompress(base64.b64decode(body["content_b64"])) == data
    assert body["sizeBytes"] == len(data)
    assert body["captured_at"] == "2023-11-14T22:13:20Z"
    assert body["filename"] == csv_file.name and body["mime"] == "text/csv"
    assert enc.sha256 == hashlib.sha256(data).hexdigest()
    assert len(enc.body) < len(data) * 0.6  # gzip pays off even on a one-day file


def test_posted_then_duplicate(settings: PostSettings, session, csv_file, webapp) -> None:
    first = post_file(session, settings, csv_file, esiid=ESIID, meter="M2")
    assert first.outcome == Outcome.POSTED and first.app_id == "1" and first.attempts == 1
    second = post_file(session, settings, csv_file, esiid=ESIID, meter="M2")
    assert second.outcome == Outcome.DUPLICATE and second.app_id == "1"
    got = webapp.received()[0]
    assert (got["esiid"], got["meter"], got["encoding"]) == (ESIID, "M2", "base64+gzip")
    assert got["content"] == csv_file.read_bytes()
    assert not webapp.pull_triggers()


def test_plain_base64_encoding(settings: PostSettings, session, csv_file, webapp) -> None:
    plain = replace(settings, encoding="base64")
    assert post_file(session, plain, csv_file, esiid=ESIID, meter="M1").outcome == "posted"
    assert webapp.received()[0]["encoding"] == "base64"


def test_too_large_is_never_sent(settings: PostSettings, session, inbox, webapp) -> None:
    big = inbox / f"big_{ESIID}.csv"
    big.write_bytes(os.urandom(1_000_000))  # incompressible
    small_cap = replace(settings, max_body_bytes=1_000_000)
    out = post_file(session, small_cap, big, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.TOO_LARGE
    assert f"cap={1_000_000}" in out.reason and f"body={out.body_bytes}" in out.reason
    assert webapp.requests() == []


def test_500_twice_then_200(settings: PostSettings, session, csv_file, webapp) -> None:
    webapp.fail_next(2, 500)
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.POSTED and out.attempts == 3
    assert len(webapp.requests()) == 3 and len(webapp.received()) == 1


def test_persistent_5xx_gives_up_after_retries(settings, session, csv_file, webapp) -> None:
    webapp.fail_next(10, 500)
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.FAILED and out.attempts == settings.retries + 1
    assert "HTTP 500" in out.reason and "STORAGE_FAILED" in out.reason


def test_platform_413_is_retried(settings, session, csv_file, webapp) -> None:
    webapp.fail_next(1, 413)
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.POSTED and out.attempts == 2


def test_429_honours_retry_after_capped(settings, session, csv_file, webapp) -> None:
    webapp.fail_next(1, 429, headers={"Retry-After": "0.3"})
    began = time.monotonic()
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.POSTED and time.monotonic() - began >= 0.3
    webapp.fail_next(1, 429, headers={"Retry-After": "3600"})
    sleeps: list[float] = []
    post_file(session, settings, csv_file, esiid=ESIID, meter="M1", sleep=sleeps.append)
    assert sleeps == [settings.retry_after_max]


@pytest.mark.parametrize("status", [401, 503])
def test_auth_and_misconfiguration_are_fatal_without_retry(
    settings, session, csv_file, webapp, status: int
) -> None:
    webapp.fail_next(5, status)
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.FATAL and out.attempts == 1
    assert len(webapp.requests()) == 1


def test_wrong_token_is_fatal(settings, session, csv_file, webapp) -> None:
    bad = replace(settings, admin_token="wrong-token-value")
    out = post_file(session, bad, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.FATAL and out.status == 401
    assert webapp.received() == []


def test_other_4xx_is_rejected_with_the_app_code(settings, session, csv_file, webapp) -> None:
    out = post_file(session, settings, csv_file, esiid="12345", meter="M1")
    assert out.outcome == Outcome.REJECTED and out.reason.startswith(
        "MISSING_ESIID: the app did not take the ESIID"
    )
    webapp.fail_next(1, 400, body={"ok": False, "error": "INLINE_SIZE_MISMATCH"})
    out = post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.REJECTED and out.reason.startswith("INLINE_SIZE_MISMATCH: ")
    assert out.attempts == 1


def test_stall_times_out_and_is_retried(settings, session, csv_file, webapp) -> None:
    quick = replace(settings, http_timeout=1.0)
    webapp.stall_next(1, 2.0)
    out = post_file(session, quick, csv_file, esiid=ESIID, meter="M1")
    # The stalled request is still stored by the app after its sleep; our retry is then
    # either new or a duplicate — both are "done".
    assert out.outcome in (Outcome.POSTED, Outcome.DUPLICATE) and out.attempts >= 2


def test_connection_refused_is_retryable(settings, session, csv_file) -> None:
    dead = replace(settings, base_url="http://127.0.0.1:9", retries=1)
    out = post_file(session, dead, csv_file, esiid=ESIID, meter="M1")
    assert out.outcome == Outcome.FAILED and "connection error to 127.0.0.1:" in out.reason


def test_token_never_logged(settings, session, csv_file, webapp, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    webapp.fail_next(1, 500)
    post_file(session, settings, csv_file, esiid=ESIID, meter="M1")
    assert settings.admin_token not in caplog.text
    assert settings.admin_token not in repr(settings)
