"""The app's large-file path: one file as parts to ``POST <base>/api/admin/smt/raw-upload``.

Since December 2025 the hosted app refuses inline posts; it takes CSVs here (the contract:
``docs/intelliwatt-contract.md``, part 2). Each part is a CSV of its own — the header line, then
whole data lines — sent as plain base64 (never gzip: the app would store 0 rows) in a JSON body
``{"filename", "sizeBytes", "sha256", "contentBase64", "contentType", "esiid", "meter", "source",
"receivedAt", "postIngest"}``, where ``sha256`` and ``sizeBytes`` are those of the part's own
bytes and ``postIngest`` is true on the last part only. A file that fits in one body goes as one
part under its own name; a larger one as ``<name>.partN-of-M``.

The parts are sized from ``SMT_MAX_BODY_BYTES``, not from a line count: :func:`split_parts`
measures the JSON around the content and packs lines up to the base64 budget that is left, and
every body is measured again before the first is sent (a line that cannot fit → ``too-large``,
nothing sent).

A file counts as posted only when every part was accepted. A part is retried like an inline post
(5xx, timeouts, 413, 429: :func:`smt_droplet.inline_post.send`); a part that still fails leaves the
whole file ``failed-will-retry`` and the ledger untouched, and the next pass sends the file from
its first part again. The app dedupes parts on their sha256 and parses a repeated part again,
replacing its rows, so a file interrupted after part k (a kill, a failure) ends stored once and
whole, never twice or half; the app's counts of that resent pass cover every part.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from . import landing
from .config import PostSettings
from .inline_post import PostOutcome, captured_at, send
from .outcomes import Outcome

PART_NAME = "{name}.part{index}-of-{total}"


class PartTooLarge(ValueError):
    """A part cannot be made to fit the body cap (a single line, or the header, is too long)."""


@dataclass(frozen=True)
class Part:
    """One request's worth of the file; its JSON body is built only when it is sent."""

    index: int  # 1-based
    total: int
    filename: str
    data: bytes
    fields: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        """The length of :attr:`body`, without building it."""
        return _body_size(self.data, self.filename, self.fields, last=self.index == self.total)

    @property
    def body(self) -> bytes:
        body = {
            **self.fields,
            "filename": self.filename,
            "sizeBytes": len(self.data),
            "sha256": self.sha256,
            "contentBase64": base64.b64encode(self.data).decode("ascii"),
            "postIngest": self.index == self.total,
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


def split_parts(
    data: bytes,
    filename: str,
    *,
    cap: int,
    fields: dict[str, Any],
) -> list[Part]:
    """The parts of ``data`` whose JSON bodies (with ``fields``) each stay within ``cap``."""
    if _body_size(data, filename, fields, last=True) <= cap:
        return [Part(1, 1, filename, data, fields)]
    pieces = data.split(b"\n")  # lines end at LF only (a CRLF line keeps its CR)
    lines = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    header, rows = lines[0], lines[1:]
    budget = _content_budget(filename, fields, cap, len(data))
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = len(header)
    for row in rows:
        if len(header) + len(row) > budget:
            raise PartTooLarge(f"a line of {len(row)} bytes cannot fit a body of {cap} bytes")
        if current and size + len(row) > budget:
            chunks.append(header + b"".join(current))
            current, size = [], len(header)
        current.append(row)
        size += len(row)
    if current or not chunks:
        chunks.append(header + b"".join(current))
    total = len(chunks)
    parts = []
    for index, chunk in enumerate(chunks, start=1):
        name = PART_NAME.format(name=filename, index=index, total=total)
        part = Part(index, total, name, chunk, fields)
        if part.size > cap:  # the budget is exact; this guards its arithmetic
            raise PartTooLarge(f"part {index} of {total} is {part.size} bytes (cap {cap})")
        parts.append(part)
    return parts


def _frame(name: str, size: int, fields: dict[str, Any], last: bool = False) -> int:
    """The bytes of a part's JSON body besides its base64 content (``last=False`` is the
    longer of the two)."""
    frame = {
        **fields,
        "filename": name,
        "sizeBytes": size,
        "sha256": "0" * 64,
        "contentBase64": "",
        "postIngest": last,
    }
    return len(json.dumps(frame, separators=(",", ":")).encode("utf-8"))


def _body_size(chunk: bytes, name: str, fields: dict[str, Any], *, last: bool) -> int:
    return _frame(name, len(chunk), fields, last) + 4 * ((len(chunk) + 2) // 3)


def _content_budget(filename: str, fields: dict[str, Any], cap: int, size: int) -> int:
    """Raw bytes a part may hold: base64 turns 3 bytes into 4, the rest of the body is fixed
    (measured with the longest part name and size this file can have)."""
    digits = len(str(size))
    longest = PART_NAME.format(name=filename, index="9" * digits, total="9" * digits)
    return max(0, (cap - _frame(longest, size, fields)) // 4 * 3)


def post_parts(
    session: requests.Session,
    settings: PostSettings,
    filename: str,
    data: bytes,
    *,
    esiid: str,
    meter: str,
    mtime: float,
    summary: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PostOutcome:
    """Send every part of one file (see the module docstring) and reconcile the app's counts."""
    digest = hashlib.sha256(data).hexdigest()
    fields = {
        "contentType": "text/csv",
        "source": settings.source,
        "esiid": esiid,
        "meter": meter,
        "receivedAt": captured_at(mtime),
    }
    try:
        parts = split_parts(
            data, filename.lstrip("/\\"), cap=settings.max_body_bytes, fields=fields
        )
    except PartTooLarge as exc:
        return PostOutcome(Outcome.TOO_LARGE, digest, len(data), 0, reason=str(exc))
    counted = landing.AppCount()
    attempts, sent, duplicates, first_id = 0, 0, 0, None
    for part in parts:
        body = part.body
        answer, tries = send(session, settings, body, sleep=sleep)
        attempts += tries
        sent += len(body)
        del body
        if answer.outcome not in (Outcome.POSTED, Outcome.DUPLICATE):
            reason = answer.reason
            if part.total > 1:
                reason = f"part {part.index} of {part.total}: {reason}"
            return PostOutcome(
                answer.outcome or Outcome.FAILED,
                digest,
                len(data),
                sent,
                answer.status,
                reason=reason,
                attempts=attempts,
                parts=part.index,
            )
        duplicates += answer.outcome == Outcome.DUPLICATE
        first_id = first_id or answer.app_id
        counted.add((answer.body or {}).get("normalizedInline"))
    outcome = Outcome.DUPLICATE if duplicates == len(parts) else Outcome.POSTED
    return PostOutcome(
        outcome,
        digest,
        len(data),
        sent,
        200,
        app_id=first_id,
        attempts=attempts,
        landing=landing.reconcile(summary, counted).to_dict(),
        parts=len(parts),
    )
