#!/usr/bin/env python3
"""A strict local double of the IntelliWatt SMT upload endpoints, in both of the app's eras.

Implements ``POST /api/admin/smt/pull`` (inline) and ``POST /api/admin/smt/raw-upload`` (the
large-file path) as the project's account of the contract (``docs/intelliwatt-contract.md``)
describes them. ``era`` picks the app: ``2025-11`` (default) takes inline posts; ``2026-dev`` is
the later app outside production: an inline post for an ESIID outside ``known_esiids`` (and
without ``homeId``) answers 400 ``HOME_ID_REQUIRED``; ``production`` is the app as hosted since
December 2025: the same check first, then 400 ``INLINE_DISABLED`` for every other inline post.
raw-upload works in every era: token, ``VALIDATION`` of ``filename`` / ``sizeBytes`` / ``sha256``,
dedupe on the client's sha256 (a repeat is ``duplicate: true`` and is parsed again), and
``normalizedInline`` computed from the content by ``intelliwatt_store.py`` (the app's parser and
interval table, with its failure modes switchable).

Inline, strictly: token (401 without ``ok``; 503 when no token is configured),
content-type, JSON, ``mode`` (anything but ``"inline"`` is recorded as a *pull trigger* and
answered 400 ``NOT_INLINE_TEST_DOUBLE`` so a test notices), base64 / base64+gzip decoding,
``sizeBytes`` against the decompressed length, ESIID (17 digits, one leading/trailing apostrophe
tolerated), sha256 dedupe (a duplicate is still 200 with ``duplicate: true, persisted: false``),
corrupt payload → 500 ``INLINE_PERSIST_FAILED``, and the hosting platform's 413 (plain text, the
body is drained and discarded, never buffered) for a request body over ``max_body_bytes``.

Test controls, in-process (:class:`IntelliWattDouble`) or over HTTP for other processes:

* ``GET  /__double/received`` (``?content=1`` adds ``content_b64``; ``?wait_for=N&timeout=S``
  blocks until N uploads were accepted or S seconds passed), ``GET /__double/requests``
* ``POST /__double/fail``  ``{"n", "status", "body", "headers"}`` — the next n upload POSTs get
  this answer (queued after earlier injections);
* ``POST /__double/stall`` ``{"n", "seconds"}`` — the next n upload POSTs sleep before answering.
  A stalled request is still processed (and an upload persisted) after the sleep, even when the
  client has given up meanwhile, as a real slow server would;
* ``POST /__double/config`` ``{"era", "known_esiids", "window_days", "drop_intervals",
  "dst_overwrite"}``;
* ``GET  /__double/assembled`` — raw-upload files put back together from their parts
  (``content_b64``, ``parts``, ``copies``), and ``GET /__double/intervals`` the interval table;
* ``POST /__double/reset``.

Stdlib only: this file is copied into containers and run with the system python3.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

try:  # imported as testbed.intelliwatt_double, or run as a script beside it (python3 -I too)
    from .intelliwatt_store import IntervalStore
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from intelliwatt_store import IntervalStore  # type: ignore[import-not-found,no-redef]

PULL_PATH = "/api/admin/smt/pull"
RAW_UPLOAD_PATH = "/api/admin/smt/raw-upload"
UPLOAD_PATHS = (PULL_PATH, RAW_UPLOAD_PATH)
ERAS = ("2025-11", "2026-dev", "production")
CONTROL_PREFIX = "/__double/"
DEFAULT_TOKEN = "t" * 64
DEFAULT_MAX_BODY = 4_500_000
SECRET_HEADERS = frozenset(
    {
        "x-admin-token",
        "x-intelliwatt-secret",
        "x-smt-secret",
        "x-webhook-secret",
        "authorization",
        "cookie",
    }
)
ESIID_RE = re.compile(r"\d{17}")
DRAIN_LIMIT = 256 * 1024 * 1024  # past this a 413 closes the connection without draining
CHUNK = 64 * 1024

log = logging.getLogger("intelliwatt_double")


class BodyTooLarge(Exception):
    """The request body exceeds the platform cap (answered 413, like the hosting platform)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"request body {size} bytes over the cap")
        self.size = size


class BadRequestBody(Exception):
    """Malformed framing (bad chunked encoding or Content-Length)."""


@dataclass(frozen=True)
class Injection:
    """One canned answer queued by :meth:`IntelliWattDouble.fail_next`."""

    status: int
    body: dict[str, Any] | str | None
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    status: int
    payload: bytes
    content_type: str
    headers: dict[str, str]
    error: str | None = None


def _default_injected_body(status: int) -> dict[str, Any] | str:
    if status == 401:
        return {"error": "Unauthorized"}
    if status == 503:
        return {"error": "ADMIN_TOKEN not configured"}
    if status == 413:
        return "Request Entity Too Large"
    if status == 429:
        return {"error": "Too Many Requests"}
    if status >= 500:
        return {"ok": False, "error": "STORAGE_FAILED", "detail": "injected by test double"}
    return {"ok": False, "error": f"INJECTED_{status}"}


def _json_answer(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    error = body.get("error") if isinstance(body.get("error"), str) else None
    return Answer(
        status=status,
        payload=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers or {},
        error=error,
    )


def _text_answer(status: int, text: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(
        status=status,
        payload=text.encode(),
        content_type="text/plain; charset=utf-8",
        headers=headers or {},
        error=None,
    )


def _injected_answer(inj: Injection) -> Answer:
    body = inj.body if inj.body is not None else _default_injected_body(inj.status)
    if isinstance(body, dict):
        return _json_answer(inj.status, body, dict(inj.headers))
    return _text_answer(inj.status, str(body), dict(inj.headers))


def _bad(code: str, **extra: Any) -> Answer:
    return _json_answer(400, {"ok": False, "error": code, **extra})


def normalize_esiid(value: Any) -> str | None:
    """The contract's ESIID rule: 17 digits after one leading/trailing apostrophe is stripped."""
    if not isinstance(value, str):
        return None
    if value.startswith("'"):
        value = value[1:]
    if value.endswith("'"):
        value = value[:-1]
    return value if ESIID_RE.fullmatch(value) else None


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class IntelliWattDouble:
    """The web app's ``/api/admin/smt/pull`` on 127.0.0.1, strict, with failure injection."""

    def __init__(
        self,
        admin_token: str | None = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        store_dir: str | None = None,
        keep_content: bool = True,
        era: str = "2025-11",
        known_esiids: tuple[str, ...] = (),
    ) -> None:
        if era not in ERAS:
            raise ValueError(f"era {era!r}: one of {', '.join(ERAS)}")
        self.era = era
        self.known_esiids = set(known_esiids)
        self.app = IntervalStore()
        self.admin_token = admin_token or None
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.store_dir = Path(store_dir) if store_dir else None
        # False: received()[i]["content"] is None (long benchmark runs would hold every file)
        self.keep_content = keep_content
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._received: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []
        self._by_sha: dict[str, dict[str, Any]] = {}
        self._failures: collections.deque[Injection] = collections.deque()
        self._stalls: collections.deque[float] = collections.deque()
        self._next_id = 1
        self._connections: set[socket.socket] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``INTELLIWATT_BASE_URL`` clients use (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.url + PULL_PATH

    def start(self) -> IntelliWattDouble:
        if self._server is not None:
            return self
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        handler = type("BoundHandler", (_Handler,), {"double": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"intelliwatt-double:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._connections)
        for conn in live:  # keep-alive connections must not outlive the "app"
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> IntelliWattDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def received(self) -> list[dict[str, Any]]:
        """Accepted uploads (200 ok) in arrival order, duplicates included."""
        with self._lock:
            return [dict(r) for r in self._received]

    def wait_received(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``count`` uploads were accepted (or ``timeout``); return them.

        For flows where something else posts asynchronously (webhook → spool → ingest).
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            return [dict(r) for r in self._received]

    def posted(self) -> list[dict[str, Any]]:
        """Accepted uploads that were new to the app (``received()`` minus duplicates)."""
        return [r for r in self.received() if not r["duplicate"]]

    def requests(self) -> list[dict[str, Any]]:
        """Every request to the upload endpoint (control calls excluded), secrets redacted."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def pull_triggers(self) -> list[dict[str, Any]]:
        """Requests the real app would have treated as a *pull trigger* (``mode`` not inline)."""
        return [r for r in self.requests() if r.get("pull_trigger")]

    def fail_next(
        self,
        n: int,
        status: int,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``n`` upload POSTs get ``status`` (queued after earlier injections).

        ``body`` None picks the app's/platform's usual body for that status (500 → JSON
        ``STORAGE_FAILED``, 413 → plain text, 401 → ``{"error": "Unauthorized"}``, ...); a str
        is sent as text/plain, a dict as JSON. ``headers`` e.g. ``{"Retry-After": "1"}``.
        """
        if n < 0 or not 100 <= status <= 599:
            raise ValueError(f"fail_next(n={n}, status={status}): bad arguments")
        inj = Injection(status=status, body=body, headers=dict(headers or {}))
        with self._lock:
            self._failures.extend([inj] * n)

    def stall_next(self, n: int, seconds: float) -> None:
        """The next ``n`` upload POSTs sleep ``seconds`` after reading the body, then answer."""
        if n < 0 or seconds < 0:
            raise ValueError(f"stall_next(n={n}, seconds={seconds}): bad arguments")
        with self._lock:
            self._stalls.extend([float(seconds)] * n)

    def configure(
        self,
        *,
        era: str | None = None,
        known_esiids: Any = None,
        window_days: Any = "unchanged",
        drop_intervals: int | None = None,
        dst_overwrite: bool | None = None,
    ) -> None:
        """Switch the era, the ESIIDs the app knows (a house address is registered), and the
        app's failure modes (``window_days`` None: off)."""
        if era is not None:
            if era not in ERAS:
                raise ValueError(f"era {era!r}: one of {', '.join(ERAS)}")
            self.era = era
        if known_esiids is not None:
            self.known_esiids = {str(e) for e in known_esiids}
        settings: dict[str, Any] = {}
        if window_days != "unchanged":
            settings["window_days"] = window_days
        if drop_intervals is not None:
            settings["drop_intervals"] = drop_intervals
        if dst_overwrite is not None:
            settings["dst_overwrite"] = dst_overwrite
        self.app.configure(settings)

    def assembled(self) -> dict[str, dict[str, Any]]:
        """raw-upload files put back together from their parts (see ``intelliwatt_store``)."""
        return self.app.assembled()

    def reset(self) -> None:
        """Forget uploads, requests, known sha256s, pending injections and the app's table
        (the era and the known ESIIDs stay)."""
        self.app.reset()
        with self._lock:
            self._received.clear()
            self._requests.clear()
            self._by_sha.clear()
            self._failures.clear()
            self._stalls.clear()
            self._next_id = 1

    # -- request processing (called from handler threads) --------------------------------------

    def _take_stall(self) -> float:
        with self._lock:
            return self._stalls.popleft() if self._stalls else 0.0

    def _take_failure(self) -> Injection | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _record_request(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    def _check_auth(self, headers: dict[str, str]) -> Answer | None:
        if not self.admin_token:
            return _json_answer(503, {"error": "ADMIN_TOKEN not configured"})
        given = headers.get("x-admin-token", "")
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return _json_answer(401, {"error": "Unauthorized"})
        return None

    def _handle_pull(self, headers: dict[str, str], body: bytes) -> tuple[Answer, bool]:
        """Answer for an upload POST whose body was read; second item: was it a pull trigger."""
        denied = self._check_auth(headers)
        if denied is not None:
            return denied, False
        if "application/json" not in headers.get("content-type", "").lower():
            return _bad("EXPECTED_JSON"), False
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _bad("BAD_JSON"), False
        if not isinstance(data, dict):
            return _bad("BAD_JSON"), False
        if data.get("mode") != "inline":
            msg = (
                "mode is not 'inline': the real app treats this as a pull trigger and calls "
                "the droplet's webhook back"
            )
            return _bad("NOT_INLINE_TEST_DOUBLE", message=msg, mode=data.get("mode")), True
        if self.era != "2025-11":
            known = normalize_esiid(data.get("esiid")) in self.known_esiids
            if not data.get("homeId") and not known:
                msg = "homeId or a known esiid is required"
                return _bad("HOME_ID_REQUIRED", message=msg), False
        if self.era == "production":
            msg = "Inline uploads are disabled in production. Use droplet large-file path."
            return _bad("INLINE_DISABLED", message=msg), False
        content_b64 = data.get("content_b64")
        if not isinstance(content_b64, str) or not content_b64:
            return _bad("INLINE_MISSING_B64"), False
        encoding = data.get("encoding", "base64")
        if encoding is None:
            encoding = "base64"
        if encoding not in ("base64", "base64+gzip"):
            return _bad("INLINE_UNSUPPORTED_ENCODING", encoding=encoding), False
        raw_name = data.get("filename")
        filename = raw_name.lstrip("/\\") if isinstance(raw_name, str) else ""
        if not filename.strip():
            return _bad("INLINE_MISSING_FILENAME"), False
        try:
            # whitespace (wrapped base64) is tolerated like the app's decoder; other junk is not
            compact = "".join(content_b64.split())
            content = base64.b64decode(compact, validate=True)
            if encoding == "base64+gzip":
                content = gzip.decompress(content)
        except (binascii.Error, OSError, EOFError, zlib.error) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            return _json_answer(
                500, {"ok": False, "error": "INLINE_PERSIST_FAILED", "detail": detail}
            ), False
        if "sizeBytes" in data and data["sizeBytes"] is not None:
            expected = data["sizeBytes"]
            numeric = isinstance(expected, (int, float)) and not isinstance(expected, bool)
            if not numeric or expected != len(content):
                return _bad("INLINE_SIZE_MISMATCH", expected=expected, actual=len(content)), False
        esiid = normalize_esiid(data.get("esiid"))
        if esiid is None:
            return _bad("MISSING_ESIID"), False
        return self._accept(data, filename, encoding, esiid, content, len(body)), False

    def _accept(
        self,
        data: dict[str, Any],
        filename: str,
        encoding: str,
        esiid: str,
        content: bytes,
        body_bytes: int,
    ) -> Answer:
        sha = hashlib.sha256(content).hexdigest()
        source = data.get("source") or "adhocusage"
        mime = data.get("mime") or "text/csv"
        meter = data.get("meter")
        captured_at = data.get("captured_at") or _utc_now_iso()
        with self._lock:
            previous = self._by_sha.get(sha)
            duplicate = previous is not None
            if previous is not None:
                record_id = previous["id"]
                storage_path = previous["storagePath"]
            else:
                record_id = str(self._next_id)
                self._next_id += 1
                storage_path = f"{source}/{esiid}/{sha[:12]}-{filename}"
            record = {
                "id": record_id,
                "filename": filename,
                "esiid": esiid,
                "meter": meter,
                "source": source,
                "mime": mime,
                "encoding": encoding,
                "captured_at": captured_at,
                "sizeBytes": len(content),
                "sha256": sha,
                "storagePath": storage_path,
                "duplicate": duplicate,
                "persisted": not duplicate,
                "body_bytes": body_bytes,
                "received_at": _utc_now_iso(),
                "content": content,
            }
            if not duplicate:
                self._by_sha[sha] = record
            self._persist(record)
            if not self.keep_content:
                record["content"] = None
            self._received.append(record)
            self._arrived.notify_all()
        message = "duplicate (already stored)" if duplicate else "stored"
        response = {
            "ok": True,
            "mode": "inline",
            "filename": filename,
            "mime": mime,
            "source": source,
            "esiid": esiid,
            "meter": meter,
            "captured_at": captured_at,
            "sizeBytes": len(content),
            "sha256": sha,
            "storagePath": storage_path,
            "persisted": not duplicate,
            "duplicate": duplicate,
            "encoding": encoding,
            "id": record_id,
            "message": message,
        }
        return _json_answer(200, response)

    def _handle_raw_upload(self, headers: dict[str, str], body: bytes) -> Answer:
        """``POST /api/admin/smt/raw-upload`` as the 2026 app answers it."""
        denied = self._check_auth(headers)
        if denied is not None:
            return denied
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = {}  # the app reads a bad body as {} and answers VALIDATION
        if not isinstance(data, dict):
            data = {}
        filename = data.get("filename")
        size = data.get("sizeBytes", data.get("size_bytes"))
        sha = data.get("sha256")
        missing = []
        if not isinstance(filename, str) or not filename:
            missing.append("filename (string)")
        if not isinstance(size, int | float) or isinstance(size, bool):
            missing.append("size_bytes|sizeBytes (number)")
        if not isinstance(sha, str) or not sha:
            missing.append("sha256 (string)")
        if missing or not isinstance(sha, str):
            return _json_answer(
                400,
                {
                    "ok": False,
                    "error": "VALIDATION",
                    "details": "Missing or invalid required fields",
                    "missing": missing,
                    "receivedKeys": list(data),
                },
            )
        encoded = data.get("contentBase64")
        try:
            content = base64.b64decode(encoded or "")  # Node's decoder: lenient
        except (binascii.Error, ValueError):
            content = b""
        esiid = data.get("esiid") if isinstance(data.get("esiid"), str) else None
        record = {
            "filename": filename,
            "sizeBytes": size,
            "sha256": sha,
            "esiid": (esiid or "").strip() or None,
            "meter": data.get("meter"),
            "source": data.get("source") or "adhocusage",
            "postIngest": data.get("postIngest") is True,
            "sha256_matches": hashlib.sha256(content).hexdigest() == sha,
            "size_matches": size == len(content),
            "body_bytes": len(body),
            "received_at": _utc_now_iso(),
            "path": RAW_UPLOAD_PATH,
        }
        duplicate, normalized = self.app.accept(record, content)
        with self._lock:
            previous = self._by_sha.get("raw:" + sha)
            record_id = previous["id"] if previous else str(self._next_id)
            if previous is None:
                self._next_id += 1
                self._by_sha["raw:" + sha] = {"id": record_id}
            entry = {
                **record,
                "id": record_id,
                "duplicate": duplicate,
                "normalizedInline": normalized,
                "content": content,
            }
            self._persist(entry)
            if not self.keep_content:
                entry["content"] = None
            self._received.append(entry)
            self._arrived.notify_all()
        answer: dict[str, Any] = {"ok": True}
        if duplicate:
            answer["duplicate"] = True
        answer.update(
            id=record_id,
            filename=filename,
            sizeBytes=size,
            sha256=sha,
            createdAt=record["received_at"],
            normalizedInline=normalized,
        )
        return _json_answer(200, answer)

    def _persist(self, record: dict[str, Any]) -> None:
        """With ``store_dir``: the file (new ones only) and one JSON line per accepted upload."""
        if self.store_dir is None:
            return
        if not record["duplicate"]:
            safe = record["filename"].replace("/", "_").replace("\\", "_")
            target = self.store_dir / "files" / f"{record['id']}-{safe}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(record["content"])
        line = {k: v for k, v in record.items() if k != "content"}
        with open(self.store_dir / "received.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


def _public(record: dict[str, Any], with_content: bool) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != "content"}
    if with_content and record["content"] is not None:
        out["content_b64"] = base64.b64encode(record["content"]).decode("ascii")
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "IntelliWattDouble/1"
    # TCP_NODELAY, as production HTTP servers set it (Node's http, nginx's tcp_nodelay): the
    # headers and the body are two writes, and with Nagle on, a keep-alive client's delayed ACK
    # holds the body back ~40 ms per response.
    disable_nagle_algorithm = True
    double: IntelliWattDouble  # set on the bound subclass

    def setup(self) -> None:
        super().setup()
        with self.double._lock:
            self.double._connections.add(self.connection)

    def finish(self) -> None:
        with self.double._lock:
            self.double._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is logged by _finish instead

    # -- body reading --------------------------------------------------------------------------

    def _read_body(self, cap: int | None) -> bytes:
        """Read the request body; over ``cap`` → drain-and-discard, then :class:`BodyTooLarge`."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked(cap)
        raw = self.headers.get("content-length")
        try:
            length = int(raw) if raw is not None else 0
        except ValueError:
            raise BadRequestBody(f"bad Content-Length {raw!r}") from None
        if length < 0:
            raise BadRequestBody(f"bad Content-Length {raw!r}")
        if cap is not None and length > cap:
            self._drain(length)
            raise BodyTooLarge(length)
        return self.rfile.read(length) if length else b""

    def _drain(self, length: int) -> None:
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        left = length
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)

    def _read_chunked(self, cap: int | None) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequestBody("bad chunk size line") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            total += size
            if cap is not None and total > cap:
                if total > DRAIN_LIMIT:
                    self.close_connection = True
                    raise BodyTooLarge(total)
                self._drain(size)  # keep draining the rest of this chunk, then the others
                parts.clear()
            else:
                parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # CRLF after the chunk
        if cap is not None and total > cap:
            raise BodyTooLarge(total)
        return b"".join(parts)

    # -- responses -----------------------------------------------------------------------------

    def _send(self, answer: Answer) -> None:
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.payload)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout during a stall)

    def _safe_headers(self) -> dict[str, str]:
        return {
            k.lower(): ("<redacted>" if k.lower() in SECRET_HEADERS else v)
            for k, v in self.headers.items()
        }

    def _finish(
        self, started: float, answer: Answer, body_bytes: int, extra: dict[str, Any] | None = None
    ) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        entry: dict[str, Any] = {
            "method": self.command,
            "path": self.path,
            "status": answer.status,
            "error": answer.error,
            "headers": self._safe_headers(),
            "body_bytes": body_bytes,
            "elapsed_ms": round(elapsed_ms, 1),
            "at": _utc_now_iso(),
        }
        entry.update(extra or {})
        self.double._record_request(entry)
        self._send(answer)
        log.info(
            "%s %s -> %d %s body=%dB %.0fms",
            self.command,
            self.path,
            answer.status,
            answer.error or "-",
            body_bytes,
            elapsed_ms,
        )

    # -- routes --------------------------------------------------------------------------------

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(CONTROL_PREFIX):
            self._control_post(path)
            return
        started = time.monotonic()
        if path not in UPLOAD_PATHS:
            body = self._read_body_or_close(None)
            self._finish(started, _json_answer(404, {"error": "Not Found"}), len(body or b""))
            return
        stall = self.double._take_stall()
        try:
            body = self._read_body(self.double.max_body_bytes)
        except BodyTooLarge as exc:
            self.close_connection = True  # the platform answers before the app: no injection used
            if stall:
                self.double._stopping.wait(stall)
            answer = _text_answer(413, "Request Entity Too Large\n")
            self._finish(started, answer, exc.size, {"error": "PLATFORM_413"})
            return
        except BadRequestBody as exc:
            self.close_connection = True
            self._finish(started, _text_answer(400, f"{exc}\n"), 0)
            return
        if stall:
            self.double._stopping.wait(stall)
        injected = self.double._take_failure()
        if injected is not None:
            self._finish(started, _injected_answer(injected), len(body), {"injected": True})
            return
        if path == RAW_UPLOAD_PATH:
            answer = self.double._handle_raw_upload(self._lower_headers(), body)
            self._finish(started, answer, len(body))
            return
        answer, trigger = self.double._handle_pull(self._lower_headers(), body)
        extra: dict[str, Any] = {"pull_trigger": True} if trigger else {}
        self._finish(started, answer, len(body), extra)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == CONTROL_PREFIX + "received":
            with_content = query.get("content", ["0"])[0] not in ("", "0", "false")
            try:
                wait_for = int(query.get("wait_for", ["0"])[0])
                timeout = min(float(query.get("timeout", ["10"])[0]), 300.0)
            except ValueError:
                self._send(_json_answer(400, {"ok": False, "error": "BAD_CONTROL"}))
                return
            found = (
                self.double.wait_received(wait_for, timeout)
                if wait_for > 0
                else self.double.received()
            )
            records = [_public(r, with_content) for r in found]
            self._send(_json_answer(200, {"received": records}))
            return
        if parts.path == CONTROL_PREFIX + "requests":
            self._send(_json_answer(200, {"requests": self.double.requests()}))
            return
        if parts.path == CONTROL_PREFIX + "assembled":
            files = {
                name: {
                    "parts": f["parts"],
                    "copies": f["copies"],
                    "content_b64": None
                    if f["content"] is None
                    else base64.b64encode(f["content"]).decode("ascii"),
                }
                for name, f in self.double.assembled().items()
            }
            self._send(_json_answer(200, {"files": files}))
            return
        if parts.path == CONTROL_PREFIX + "intervals":
            self._send(_json_answer(200, {"intervals": self.double.app.stored()}))
            return
        if parts.path in UPLOAD_PATHS:
            self._send(_json_answer(405, {"error": "Method Not Allowed"}, {"Allow": "POST"}))
            return
        if parts.path in ("/healthz", CONTROL_PREFIX + "health"):
            self._send(_json_answer(200, {"ok": True}))
            return
        self._send(_json_answer(404, {"error": "Not Found"}))

    def _lower_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _read_body_or_close(self, cap: int | None) -> bytes | None:
        try:
            return self._read_body(cap)
        except (BodyTooLarge, BadRequestBody):
            self.close_connection = True
            return None

    def _control_post(self, path: str) -> None:
        body = self._read_body_or_close(1024 * 1024)
        try:
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            name = path[len(CONTROL_PREFIX) :]
            if name == "fail":
                self.double.fail_next(
                    int(data.get("n", 1)),
                    int(data["status"]),
                    data.get("body"),
                    data.get("headers"),
                )
            elif name == "stall":
                self.double.stall_next(int(data.get("n", 1)), float(data["seconds"]))
            elif name == "reset":
                self.double.reset()
            elif name == "config":
                self.double.configure(
                    era=data.get("era"),
                    known_esiids=data.get("known_esiids"),
                    window_days=data.get("window_days", "unchanged"),
                    drop_intervals=data.get("drop_intervals"),
                    dst_overwrite=data.get("dst_overwrite"),
                )
            else:
                self._send(_json_answer(404, {"error": "Not Found"}))
                return
        except (ValueError, KeyError, TypeError) as exc:
            self._send(_json_answer(400, {"ok": False, "error": "BAD_CONTROL", "detail": str(exc)}))
            return
        log.info("control %s %s", path, json.dumps(data, sort_keys=True))
        self._send(_json_answer(200, {"ok": True}))


def _read_token(args: argparse.Namespace) -> str | None:
    if args.no_token:
        return None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if token.startswith("ADMIN_TOKEN="):  # accept an env-file style line too
            token = token.split("=", 1)[1].strip().strip("'\"")
        return token
    if args.token:
        return args.token
    return os.environ.get("ADMIN_TOKEN") or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Strict local double of IntelliWatt's POST /api/admin/smt/pull "
        "(plus /__double/* test controls)."
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port (0 = pick a free one)")
    parser.add_argument("--token-file", help="file holding the admin token (preferred)")
    parser.add_argument("--token", help="admin token (visible in ps; prefer --token-file)")
    parser.add_argument(
        "--no-token", action="store_true", help="run without a token: every upload gets 503"
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    parser.add_argument(
        "--era",
        choices=ERAS,
        default="2025-11",
        help="the app's era: production refuses inline posts (INLINE_DISABLED)",
    )
    parser.add_argument(
        "--known-esiid",
        action="append",
        default=[],
        help="an ESIID the app knows (production inline: others get HOME_ID_REQUIRED)",
    )
    parser.add_argument("--store-dir", help="write accepted files and received.jsonl here")
    parser.add_argument(
        "--no-keep-content",
        action="store_true",
        help="do not keep uploaded bytes in memory (long benchmark runs)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    token = _read_token(args)
    if token is None and not args.no_token:
        parser.error("no token: pass --token-file, set ADMIN_TOKEN, or --no-token for 503 mode")
    double = IntelliWattDouble(
        admin_token=token,
        host=args.bind,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        store_dir=args.store_dir,
        keep_content=not args.no_keep_content,
        era=args.era,
        known_esiids=tuple(args.known_esiid),
    )
    double.start()
    log.info(
        "listening on %s (POST %s), max body %d bytes", double.url, PULL_PATH, args.max_body_bytes
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
