"""How one file is posted to the web app: :func:`post_file`, and nothing else posts.

The request follows ``INTELLIWATT-CONTRACT.md``: ``POST <base>/api/admin/smt/pull`` with
``x-admin-token`` and a JSON body ``{"mode": "inline", "source", "filename", "mime",
"encoding", "content_b64", "sizeBytes", "esiid", "meter", "captured_at"}``. ``sizeBytes`` is the
raw file's length, ``captured_at`` its mtime in UTC, ``content_b64`` the base64 of the gzip of the
bytes (``SMT_ENCODING=base64+gzip``, the default) or of the bytes themselves (``base64``). The
body is built in memory (no subprocess, no argument limits) and measured against
``SMT_MAX_BODY_BYTES`` *before* anything is sent: over the cap → ``too-large``, never sent.

Outcomes (:class:`PostOutcome`):

* ``posted`` / ``duplicate`` — 200 with ``ok: true``; the caller records the digest.
* ``rejected`` — another 4xx (the app's ``error`` code in ``reason``); retrying the same bytes
  cannot help, so the caller remembers it until the file changes or an operator forces it.
* ``too-large`` — the encoded body exceeds the cap; never sent.
* ``failed`` — 5xx, timeout, connection error, the platform's 413, 429: retried here
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

POSTED = "posted"
DUPLICATE = "duplicate"
REJECTED = "rejected"
TOO_LARGE = "too-large"
FAILED = "failed"
FATAL = "fatal"


@dataclass(frozen=True)
class EncodedFile:
    """The request body for one file, and the facts the ledger needs."""

    body: bytes
    sha256: str
    raw_bytes: int


@dataclass(frozen=True)
class PostOutcome:
    """What happened to one POST (after retries)."""

    outcome: str
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
    if data is None:
        data = path.read_bytes()
    if mtime is None:
        mtime = path.stat().st_mtime
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

    def result(outcome: str, **kw: Any) -> PostOutcome:
        return PostOutcome(outcome, encoded.sha256, encoded.raw_bytes, body_bytes, **kw)

    if body_bytes > settings.max_body_bytes:
        return result(TOO_LARGE, reason=f"body={body_bytes} cap={settings.max_body_bytes}")

    headers = {"content-type": "application/json", "x-admin-token": settings.admin_token}
    attempts = 0
    reason = ""
    status: int | None = None
    while True:
        attempts += 1
        wait: float | None = None
        try:
            response = session.post(
                settings.endpoint,
                data=encoded.body,
                headers=headers,
                timeout=(min(10.0, settings.http_timeout), settings.http_timeout),
                allow_redirects=False,
            )
        except requests.Timeout:
            status, reason = None, f"timeout after {settings.http_timeout:g}s"
        except requests.RequestException as exc:
            status, reason = None, f"connection error: {type(exc).__name__}"
        else:
            status = response.status_code
            answer = _json(response)
            if status == 200 and answer.get("ok") is True:
                app_id = answer.get("id")
                return result(
                    DUPLICATE if answer.get("duplicate") else POSTED,
                    status=status,
                    app_id=None if app_id is None else str(app_id),
                    attempts=attempts,
                )
            if status in (401, 503):
                detail = answer.get("error") or response.reason or ""
                return result(
                    FATAL, status=status, reason=f"HTTP {status} {detail}", attempts=attempts
                )
            if status == 429:
                wait = _retry_after(response.headers.get("retry-after"), settings.retry_after_max)
                reason = "HTTP 429 rate limited"
            elif status == 413:
                reason = f"HTTP 413 from the platform (body {body_bytes} bytes)"
            elif status >= 500 or status == 200 or status == 408:
                code = answer.get("error") or answer.get("message") or ""
                reason = f"HTTP {status} {code}".strip()
            elif 400 <= status < 500:
                code = str(answer.get("error") or f"HTTP_{status}")
                return result(REJECTED, status=status, reason=code, attempts=attempts)
            else:
                reason = f"unexpected HTTP {status}"
        if attempts > settings.retries:
            return result(FAILED, status=status, reason=reason, attempts=attempts)
        if wait is None:
            wait = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempts - 1))
        sleep(wait)
