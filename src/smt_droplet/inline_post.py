"""How one file is posted to the web app: :func:`post_file`, and nothing else posts.

The request follows ``INTELLIWATT-CONTRACT.md``: ``POST <base>/api/admin/smt/pull`` with
``x-admin-token`` and a JSON body ``{"mode": "inline", "source", "filename", "mime",
"encoding", "content_b64", "sizeBytes", "esiid", "meter", "captured_at"}``. ``sizeBytes`` is the
raw file's length, ``captured_at`` its mtime in UTC, ``content_b64`` the base64 of the gzip of the
bytes (``SMT_ENCODING=base64+gzip``, the default) or of the bytes themselves (``base64``). The
body is built in memory (no subprocess, no argument limits) and measured against
``SMT_MAX_BODY_BYTES`` *before* anything is sent: over the cap → ``too-large``, never sent.

Outcomes (:class:`PostOutcome`, values of :class:`~smt_droplet.outcomes.Outcome`):

* ``posted`` / ``duplicate`` — 200 with ``ok: true``; the caller records the digest.
* ``rejected`` — another 4xx (the app's ``error`` code in ``reason``); retrying the same bytes
  cannot help, so the caller remembers it until the file changes or an operator forces it.
* ``too-large`` — the encoded body exceeds the cap; never sent.
* ``failed-will-retry`` — 5xx, timeout, connection error, the platform's 413, 429: retried here
  ``retries`` times with exponential backoff (``retry_base_delay`` * 2**n, capped at
  ``retry_max_delay``; a 429's ``Retry-After`` is honoured up to ``retry_after_max``), then left
  for the next pass.
* ``fatal`` — 401 or 503: the token or the app is misconfigured; the pass stops at once.

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

import requests

from .config import PostSettings
from .outcomes import Outcome


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
class _Answer:
    """One attempt's classification: ``outcome`` None means "retry" (after ``wait`` if set)."""

    outcome: Outcome | None
    status: int | None
    reason: str = ""
    app_id: str | None = None
    wait: float | None = None


def post_file(
    session: requests.Session,
    settings: PostSettings,
    path: Path,
    *,
    esiid: str,
    meter: str,
    data: bytes | None = None,
    mtime: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PostOutcome:
    """Post one file (with the retries described above) and classify the answer."""
    encoded = encode_file(
        path.read_bytes() if data is None else data,
        filename=path.name,
        mtime=path.stat().st_mtime if mtime is None else mtime,
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
    attempts = 0
    while True:
        attempts += 1
        answer = _attempt(session, settings, encoded.body)
        if answer.outcome is None and attempts > settings.retries:
            answer = _Answer(Outcome.FAILED, answer.status, answer.reason)
        if answer.outcome is not None:
            return PostOutcome(
                answer.outcome,
                encoded.sha256,
                encoded.raw_bytes,
                body_bytes,
                answer.status,
                app_id=answer.app_id,
                reason=answer.reason,
                attempts=attempts,
            )
        if answer.wait is None:
            sleep(min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempts - 1)))
        else:
            sleep(answer.wait)


def _attempt(session: requests.Session, settings: PostSettings, body: bytes) -> _Answer:
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
        return _Answer(None, None, f"timeout after {settings.http_timeout:g}s")
    except requests.RequestException as exc:
        return _Answer(None, None, f"connection error: {type(exc).__name__}")
    return _classify(response, settings, len(body))


def _classify(response: requests.Response, settings: PostSettings, body_bytes: int) -> _Answer:
    """The contract's answers: 200 ok, 401/503 fatal, 429/413/408/5xx retried, other 4xx final."""
    status = response.status_code
    answer = _json(response)
    if status == 200 and answer.get("ok") is True:
        app_id = answer.get("id")
        outcome = Outcome.DUPLICATE if answer.get("duplicate") else Outcome.POSTED
        return _Answer(outcome, status, app_id=None if app_id is None else str(app_id))
    if status in (401, 503):
        detail = answer.get("error") or response.reason or ""
        return _Answer(Outcome.FATAL, status, f"HTTP {status} {detail}")
    if status == 429:
        wait = _retry_after(response.headers.get("retry-after"), settings.retry_after_max)
        return _Answer(None, status, "HTTP 429 rate limited", wait=wait)
    if status == 413:
        return _Answer(None, status, f"HTTP 413 from the platform (body {body_bytes} bytes)")
    if status >= 500 or status == 200 or status == 408:
        code = answer.get("error") or answer.get("message") or ""
        return _Answer(None, status, f"HTTP {status} {code}".strip())
    if 400 <= status < 500:
        return _Answer(Outcome.REJECTED, status, str(answer.get("error") or f"HTTP_{status}"))
    return _Answer(None, status, f"unexpected HTTP {status}")
