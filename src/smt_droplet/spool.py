"""The request queue between the front doors (webhook, upload server) and the ingest pass.

Layout under ``SMT_SPOOL_DIR`` (all on one filesystem, so renames are atomic)::

    tmp/          writers create ``<id>.json`` here, fsync, then rename into queue/
    queue/        watched by ``smt-ingest.path`` (``DirectoryNotEmpty=``); holds only whole requests
    processing/   the ingest pass moves the requests it serves here at its start
    status/       ``last-ingest.json``: the outcome of the latest pass (read by ``GET /health``)

Why a processing area: a ``.path`` unit re-triggers as soon as the service stops while ``queue/``
is non-empty. The pass takes its requests out of ``queue/`` first, so a failed pass (web app
down) does not loop; the timer retries later. Requests left in ``processing/`` by a crashed pass
are served again by the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import durable

SUBDIRS = ("tmp", "queue", "processing", "status")
LAST_RESULT = "last-ingest.json"


class SpoolError(OSError):
    """The spool cannot be written or read."""


@dataclass(frozen=True)
class Request:
    """One queued ask for an ingest pass."""

    id: str
    kind: str  # "webhook" | "upload" | "cli" | "page" (the operator page: smt_droplet.actions)
    received_at: float
    reason: str | None = None
    esiid: str | None = None
    meter: str | None = None
    force_repost: bool = False
    filename: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def ensure_layout(spool_dir: Path) -> None:
    """Create the sub-directories (group-writable; the role makes them setgid)."""
    for sub in SUBDIRS:
        (spool_dir / sub).mkdir(parents=True, exist_ok=True)


def enqueue(spool_dir: Path, kind: str, **fields: Any) -> Request:
    """Durably queue one request; returns it once it is in ``queue/``."""
    request = Request(
        id=f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}",
        kind=kind,
        received_at=time.time(),
        **fields,
    )
    try:
        durable.write_json_atomic(
            spool_dir / "queue" / f"{request.id}.json", asdict(request), tmp_dir=spool_dir / "tmp"
        )
    except OSError as exc:
        raise SpoolError(f"cannot queue request in {spool_dir}: {exc.strerror or exc}") from exc
    return request


def depth(spool_dir: Path) -> int:
    """Requests waiting in ``queue/`` (not yet claimed by a pass)."""
    try:
        return sum(1 for entry in os.scandir(spool_dir / "queue") if entry.name.endswith(".json"))
    except FileNotFoundError:
        return 0


def is_waiting(spool_dir: Path, request_id: str) -> bool:
    """Whether the request is still queued or in the hands of a pass (not served yet)."""
    name = f"{request_id}.json"
    return any((spool_dir / sub / name).exists() for sub in ("queue", "processing"))


def _load(path: Path) -> Request | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {k: raw[k] for k in Request.__dataclass_fields__ if k in raw}
        return Request(**known)
    except (OSError, ValueError, TypeError):
        return None


def claim(spool_dir: Path) -> list[Request]:
    """Move every queued request into ``processing/`` and return all of processing/.

    Unreadable request files are dropped (moved aside as ``*.bad``) so they cannot wedge the queue.
    """
    queue, processing = spool_dir / "queue", spool_dir / "processing"
    if not queue.is_dir():
        return []
    processing.mkdir(exist_ok=True)
    for entry in sorted(os.scandir(queue), key=lambda e: e.name):
        with contextlib.suppress(FileNotFoundError):
            os.replace(entry.path, processing / entry.name)
    claimed: list[Request] = []
    for entry in sorted(os.scandir(processing), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        request = _load(Path(entry.path))
        if request is None:
            with contextlib.suppress(OSError):
                os.replace(entry.path, entry.path + ".bad")
            continue
        claimed.append(request)
    return claimed


def finish(spool_dir: Path, requests: list[Request]) -> None:
    """Forget requests a pass has served."""
    for request in requests:
        with contextlib.suppress(FileNotFoundError):
            (spool_dir / "processing" / f"{request.id}.json").unlink()


def write_last_result(spool_dir: Path, result: dict[str, Any]) -> None:
    """Record the outcome of the latest pass for ``GET /health``."""
    status = spool_dir / "status"
    with contextlib.suppress(OSError):
        status.mkdir(parents=True, exist_ok=True)
        durable.write_json_atomic(status / LAST_RESULT, result)


def read_last_result(spool_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((spool_dir / "status" / LAST_RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
