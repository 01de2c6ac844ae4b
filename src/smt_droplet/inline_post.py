"""How one file is posted to the web app: :func:`post_file`, and nothing else posts.

Two delivery modes (``SMT_DELIVERY``; the contract is ``docs/intelliwatt-contract.md``):

``inline`` (default) — ``POST <base>/api/admin/smt/pull`` with ``x-admin-token`` and a JSON body
``{"mode": "inline", "source", "filename", "mime", "encoding", "content_b64", "sizeBytes",
"esiid", "meter", "captured_at"}``. ``sizeBytes`` is the raw file's length, ``captured_at`` its
mtime in UTC, ``content_b64`` the base64 of the gzip of the bytes (``SMT_ENCODING=base64+gzip``,
the default) or of the bytes themselves (``base64``). The app's answer carries no count, so the
landing verdict is ``unverified``.

``raw-upload`` — the app's large-file path, in parts (:mod:`smt_droplet.raw_upload`); its answers
say what the app stored, and :mod:`smt_droplet.landing` compares that with the file.

Every body is built in memory (no subprocess, no argument limits) and measured against
``SMT_MAX_BODY_BYTES`` *before* anything is sent: over the cap → ``too-large``, never sent.

Outcomes (:class:`PostOutcome`, values of :class:`~smt_droplet.outcomes.Outcome`):

* ``posted`` / ``duplicate`` — 200 with ``ok: true``; the caller records the digest.
* ``rejected`` — another 4xx (the app's ``error`` code in ``reason``); retrying the same bytes
  cannot help, so the caller remembers it until the file changes or an operator forces it.
* ``waiting-for-app`` — 400 ``HOME_ID_REQUIRED``: the app has no house for this ESIID yet; the
  file is tried again on a slow schedule (it heals when the customer's address is added).
* ``too-large`` — the encoded body exceeds the cap; never sent.
* ``failed-will-retry`` — 5xx, timeout, connection error, the platform's 413, 429: retried here
  ``retries`` times with exponential backoff (``retry_base_delay`` * 2**n, capped at
  ``retry_max_delay``; a 429's ``Retry-After`` is honoured up to ``retry_after_max``), then left
  for the next pass. In raw-upload mode the retries are per part.
* ``fatal`` — 401 or 503 (the token or the app is misconfigured), or 400 ``INLINE_DISABLED``
  (the app takes no inline posts: ``SMT_DELIVERY=raw-upload``); the pass stops at once.

The token goes only into the header; it is never logged or put into a result.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from . import landing
from .config import PostSettings
from .outcomes import Outcome

# The app's answers that are about the app or one ESIID, not about the file.
INLINE_DISABLED = "INLINE_DISABLED"
HOME_ID_REQUIRED = "HOME_ID_REQUIRED"
INLINE_DISABLED_HINT = (
    "the app refuses every inline post (400 INLINE_DISABLED, production since 2025-12-05): "
    "switch to its large-file path with SMT_DELIVERY=raw-upload (Ansible: "
    "smt_ingest_delivery: raw-upload)"
)


@dataclass(frozen=True)
class EncodedFile:
    """The request body for one file, and the facts the ledger needs."""

    body: bytes
    sha256: str
    raw_bytes: int


@dataclass(frozen=True)
class PostOutcome:
    """What happened to one POST (after retries)."""

    outcome: Outcome
    sha256: str
    raw_bytes: int
    body_bytes: int
    status: int | None = None
    app_id: str | None = None
    reason: str = ""
    attempts: int = 0
    landing: dict[str, Any] | None = None  # landing.Landing.to_dict() (posted/duplicate only)
    parts: int = 1  # requests that carried the file (raw-upload: its parts)


def captured_at(mtime: float) -> str:
    """The file's mtime as ISO-8601 UTC with a ``Z`` (what the app stores)."""
    return (
        datetime.fromtimestamp(mtime, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def encode_file(
    data: bytes,
    *,
    filename: str,
    mtime: float,
    esiid: str,
    meter: str,
    source: str,
    encoding: str,
) -> EncodedFile:
    """Build the JSON body for ``data`` exactly per the contract."""
    if encoding == "base64+gzip":
        payload = gzip.compress(data, compresslevel=6, mtime=0)
    elif encoding == "base64":
        payload = data
    else:
        raise ValueError(f"unsupported encoding {encoding!r}")
    mime = "text/csv" if filename.lower().endswith(".csv") else "application/octet-stream"
    body = {
        "mode": "inline",
        "source": source,
        "filename": filename.lstrip("/\\"),
        "mime": mime,
        "encoding": encoding,
        "content_b64": base64.b64encode(payload).decode("ascii"),
        "sizeBytes": len(data),
        "esiid": esiid,
        "meter": meter,
        "captured_at": captured_at(mtime),
    }
    return EncodedFile(
        body=json.dumps(body, separators=(",", ":")).encode("ascii"),
        sha256=hashlib.sha256(data).hexdigest(),
        raw_bytes=len(data),
    )


# What to do about a file the app refused, by its error code (docs/intelliwatt-contract.md).
_OUR_REQUEST = (
    "the app could not read the droplet's request (a droplet bug): report it with this line; "
    "after an upgrade `smt-droplet forget FILE` sends it again"
)
REJECTION_HINTS = {
    "EXPECTED_JSON": _OUR_REQUEST,
    "BAD_JSON": _OUR_REQUEST,
    "INLINE_MISSING_B64": _OUR_REQUEST,
    "INLINE_UNSUPPORTED_ENCODING": _OUR_REQUEST,
    "INLINE_MISSING_FILENAME": _OUR_REQUEST,
    "VALIDATION": _OUR_REQUEST,
    "INLINE_SIZE_MISMATCH": (
        "the app decoded other bytes than were sent: `smt-droplet forget FILE` sends it again; "
        "if it happens again, report it with this line"
    ),
    "MISSING_ESIID": (
        "the app did not take the ESIID: post it with `smt-droplet post FILE --esiid ESIID`"
    ),
}


def rejection_hint(code: str) -> str:
    """The next step for a file the app refused with ``code``."""
    return REJECTION_HINTS.get(code) or (
        f"the app refused this file with {code}, a code its contract does not list: look for "
        "the file in the app's log; `smt-droplet forget FILE` sends it again, "
        "`smt-droplet ignore FILE --reason TEXT` settles it"
    )


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(tz=UTC)).total_seconds()
    return min(max(seconds, 0.0), cap)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        parsed = response.json()
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


@dataclass(frozen=True)
class Answer:
    """One attempt's classification: ``outcome`` None means "retry" (after ``wait`` if set).
    ``body``: the app's JSON answer of a 200 (raw-upload reads ``normalizedInline`` from it)."""

    outcome: Outcome | None
    status: int | None
    reason: str = ""
    app_id: str | None = None
    wait: float | None = None
    body: dict[str, Any] | None = None


def post_file(
    session: requests.Session,
    settings: PostSettings,
    path: Path,
    *,
    esiid: str,
    meter: str,
    data: bytes | None = None,
    mtime: float | None = None,
    summary: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PostOutcome:
    """Post one file by ``settings.delivery`` (with the retries described above) and classify
    the answer. ``summary``: the file's :class:`~smt_droplet.csvdata.DataSummary` dict, for the
    landing verdict."""
    data = path.read_bytes() if data is None else data
    mtime = path.stat().st_mtime if mtime is None else mtime
    if settings.delivery == "raw-upload":
        from .raw_upload import post_parts

        return post_parts(
            session,
            settings,
            path.name,
            data,
            esiid=esiid,
            meter=meter,
            mtime=mtime,
            summary=summary,
            sleep=sleep,
        )
    encoded = encode_file(
        data,
        filename=path.name,
        mtime=mtime,
        esiid=esiid,
        meter=meter,
        source=settings.source,
        encoding=settings.encoding,
    )
    body_bytes = len(encoded.body)
    if body_bytes > settings.max_body_bytes:
        reason = f"body={body_bytes} cap={settings.max_body_bytes}"
        return PostOutcome(
            Outcome.TOO_LARGE, encoded.sha256, encoded.raw_bytes, body_bytes, reason=reason
        )
    answer, attempts = send(session, settings, encoded.body, sleep=sleep)
    verdict = (
        landing.unverified(summary).to_dict()
        if answer.outcome in (Outcome.POSTED, Outcome.DUPLICATE)
        else None
    )
    return PostOutcome(
        answer.outcome or Outcome.FAILED,
        encoded.sha256,
        encoded.raw_bytes,
        body_bytes,
        answer.status,
        app_id=answer.app_id,
        reason=answer.reason,
        attempts=attempts,
        landing=verdict,
    )


def send(
    session: requests.Session,
    settings: PostSettings,
    body: bytes,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Answer, int]:
    """POST ``body`` to ``settings.endpoint`` until an answer is final or the retries are
    spent (then ``failed-will-retry``); returns the answer and the attempts it took."""
    attempts = 0
    while True:
        attempts += 1
        answer = _attempt(session, settings, body)
        if answer.outcome is None and attempts > settings.retries:
            answer = Answer(Outcome.FAILED, answer.status, answer.reason)
        if answer.outcome is not None:
            return answer, attempts
        if answer.wait is None:
            sleep(min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempts - 1)))
        else:
            sleep(answer.wait)


def _attempt(session: requests.Session, settings: PostSettings, body: bytes) -> Answer:
    """One POST; the token goes only into the header."""
    headers = {"content-type": "application/json", "x-admin-token": settings.admin_token}
    try:
        response = session.post(
            settings.endpoint,
            data=body,
            headers=headers,
            timeout=(min(10.0, settings.http_timeout), settings.http_timeout),
            allow_redirects=False,
        )
    except requests.Timeout:
        host = urlsplit(settings.endpoint).netloc
        return Answer(None, None, f"timeout after {settings.http_timeout:g}s from {host}")
    except requests.RequestException as exc:
        host = urlsplit(settings.endpoint).netloc
        return Answer(None, None, f"connection error to {host}: {type(exc).__name__}")
    return _classify(response, settings, len(body))


def _classify(response: requests.Response, settings: PostSettings, body_bytes: int) -> Answer:
    """The contract's answers: 200 ok, 401/503 fatal, 429/413/408/5xx retried, other 4xx final."""
    status = response.status_code
    answer = _json(response)
    if status == 200 and answer.get("ok") is True:
        app_id = answer.get("id")
        outcome = Outcome.DUPLICATE if answer.get("duplicate") else Outcome.POSTED
        app_id = None if app_id is None else str(app_id)
        return Answer(outcome, status, app_id=app_id, body=answer)
    if status in (401, 503):
        detail = answer.get("error") or response.reason or ""
        hint = "check ADMIN_TOKEN / the app's configuration"
        return Answer(Outcome.FATAL, status, f"HTTP {status} {detail} — {hint}")
    if status == 429:
        wait = _retry_after(response.headers.get("retry-after"), settings.retry_after_max)
        return Answer(None, status, "HTTP 429 rate limited", wait=wait)
    if status == 413:
        return Answer(None, status, f"HTTP 413 from the platform (body {body_bytes} bytes)")
    if status >= 500 or status == 200 or status == 408:
        code = answer.get("error") or answer.get("message") or ""
        return Answer(None, status, f"HTTP {status} {code}".strip())
    code = answer.get("error")
    if status == 400 and code == INLINE_DISABLED:
        return Answer(Outcome.FATAL, status, INLINE_DISABLED_HINT)
    if status == 400 and code == HOME_ID_REQUIRED:
        return Answer(Outcome.WAITING, status, HOME_ID_REQUIRED)
    if 400 <= status < 500:
        code = str(code or f"HTTP_{status}")
        return Answer(Outcome.REJECTED, status, f"{code}: {rejection_hint(code)}")
    return Answer(None, status, f"unexpected HTTP {status}")
