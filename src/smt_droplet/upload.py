"""``smt-droplet upload-server``: ``POST /upload`` stores one CSV in the inbox and queues ingest.

Order of checks, cheapest and safest first, so a rejected request never writes a byte:

1. ``x-smt-upload-token`` (when ``SMT_UPLOAD_TOKEN`` is set; constant time) → 401;
   ``Content-Length`` beyond the cap → 413; not ``multipart/form-data`` → 415. With
   ``Expect: 100-continue`` these run before the client even sends the body.
2. The rate limit (persistent, :mod:`smt_droplet.ratelimit`), keyed ``role:accountKey`` (client
   address when no account key): from the ``x-smt-upload-role`` / ``x-smt-upload-account-key``
   headers before the body; otherwise from the ``role`` / ``accountKey`` form fields that precede
   the ``file`` part, before the file's first byte → 429 with ``Retry-After`` and ``resetAt``.
   Fields that arrive after the file are honoured too, before the file is stored.
3. The file part: the name must be CSV-like (``.csv``, ``.csv.<n>``) → else 415; its first line
   must look like CSV → else 400; it is streamed in 64 KiB chunks to ``<inbox>/.upload-<uuid>.part``
   (a name the ingest globs never match) while its SHA256 and size are computed; beyond
   ``SMT_UPLOAD_MAX_BYTES`` → 413 and the partial file is removed.
4. A digest already in the ledger (``STATE_FILE``) → 200 ``duplicate`` and nothing is stored or
   queued. Otherwise: fsync, ``link()`` to ``<UTC yyyymmddTHHMMSS>_<sanitized name>`` (never
   overwrites; ``-1``, ``-2``... on a clash), fsync the inbox, queue a spool request (fsynced)
   → 202.

Optional form fields ``esiid`` (17 digits) and ``meter`` travel with the spool request and become
that file's attribution default in the ingest pass (the file's own ESIID still wins).

Every failure path removes the partial file (``finally``), including a client that disconnects
mid-body and a SIGTERM that outlasts the shutdown grace. An upload counts against the limit once
its body has been received (stored or duplicate); uploads rejected for size, type or a broken body
give their slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import BodyPartReader, web, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError

from . import filenames, spool
from .config import UPLOAD_ROLES, UploadSettings
from .esiid import FieldError, parse_esiid, parse_meter
from .httpserver import (
    RequestTracker,
    json_error,
    log_access,
    run_app,
    secrets_equal,
    set_outcome,
)
from .outcomes import ExitCode
from .ratelimit import Decision, RateLimiter, RateLimitError

log = logging.getLogger("smt_droplet.upload")

TOKEN_HEADER = "x-smt-upload-token"  # noqa: S105 - a header name
ROLE_HEADER = "x-smt-upload-role"
ACCOUNT_HEADER = "x-smt-upload-account-key"
CHUNK = 1024 * 1024  # measured 10-20% faster than 64 KiB per 25 MB upload; peak RSS flat
SNIFF_BYTES = 8192
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the file itself
MAX_FIELD = 256
MAX_EXTRA_FIELD = 64 * 1024
MAX_ACCOUNT_KEY = 128

_default_expect_handler = web_urldispatcher._default_expect_handler

# What a cut-off or malformed body raises from aiohttp's readers (3.8 and later).
_BODY_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,  # ClientPayloadError, ClientConnectionError
    HttpProcessingError,  # ContentLengthError, TransferEncodingError
    ConnectionError,
    asyncio.IncompleteReadError,
    EOFError,
)


def looks_like_csv(head: bytes, at_eof: bool) -> tuple[bool, str]:
    """Sniff the start of an upload: ``(ok, reason)``.

    The first line must be UTF-8 text without NULs or control characters, contain a comma, and
    end within the first 8 KiB (unless the file is shorter). Zip, gzip and PGP payloads fail.
    """
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if not head.strip():
        return False, "the file is empty"
    if b"\x00" in head:
        return False, "the file is binary, not a CSV"
    newline = head.find(b"\n")
    if newline < 0 and not at_eof:
        return False, f"the first line is longer than {SNIFF_BYTES} bytes"
    line = head if newline < 0 else head[:newline]
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return False, "the first line is not UTF-8 text"
    if any(not ch.isprintable() and ch != "\t" for ch in text):
        return False, "the first line contains control characters"
    if "," not in text:
        return False, "the first line has no comma-separated columns"
    return True, ""


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Attempt:
    """Per-request state the cleanup in ``finally`` needs."""

    decision: Decision | None = None
    counted: bool = False
    tmp: Path | None = None
    fd: int | None = None
    size: int = 0
    sha256: str = ""
    original: str = ""
    role: str = ""
    account: str = ""
    esiid: str | None = None
    meter: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _Reject(Exception):
    """Control flow: a check failed; carries the error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class UploadService:
    """Handlers plus the state they share: the limiter and the partial files in flight."""

    def __init__(self, settings: UploadSettings, limiter: RateLimiter) -> None:
        self.settings = settings
        self.limiter = limiter
        self.partial_files: set[Path] = set()
        self._ledger_key: tuple[int, int, int] | None = None
        self._ledger: set[str] = set()
        self._rename_lock = threading.Lock()

    # -- checks before the body ------------------------------------------------------------

    def _precheck(self, request: web.Request) -> web.Response | None:
        token = self.settings.token
        if token is not None and not secrets_equal(request.headers.get(TOKEN_HEADER), token):
            return json_error(request, 401, "unauthorized", "Invalid or missing SMT upload token")
        limit = self.settings.max_bytes + MULTIPART_SLACK
        if request.content_length is not None and request.content_length > limit:
            return json_error(
                request,
                413,
                "file_too_large",
                f"upload exceeds {self.settings.max_bytes} bytes",
                maxBytes=self.settings.max_bytes,
            )
        if not request.content_type.startswith("multipart/form-data"):
            return json_error(
                request,
                415,
                "expected_multipart",
                "send multipart/form-data with the CSV in the field 'file'",
            )
        return None

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse before the client sends a byte of the body."""
        started = time.monotonic()
        rejected = self._precheck(request)
        if rejected is None and (
            request.headers.get(ROLE_HEADER) or request.headers.get(ACCOUNT_HEADER)
        ):
            try:
                self._peek_limit(request)
            except _Reject as reject:
                rejected = reject.response
            except RateLimitError as exc:
                log.error("%s", exc)  # the handler answers 503 after 100-continue
        if rejected is not None:
            rejected.force_close()
            log_access(request, rejected.status, rejected.content_length or 0, started)
            return self._cors(request, rejected)
        return await _default_expect_handler(request)

    def _key(self, request: web.Request, role: str, account: str) -> str:
        return f"{role}:{account}" if account else f"{role}:ip:{request.remote or 'unknown'}"

    def _identity(self, request: web.Request, attempt: _Attempt) -> tuple[str, str]:
        role = (
            (
                request.headers.get(ROLE_HEADER)
                or attempt.fields.get("role")
                or self.settings.default_role
            )
            .strip()
            .lower()
        )
        account = (
            request.headers.get(ACCOUNT_HEADER) or attempt.fields.get("accountKey") or ""
        ).strip()
        if role not in UPLOAD_ROLES:
            raise _Reject(json_error(request, 400, "bad_role", "role must be admin or customer"))
        if len(account) > MAX_ACCOUNT_KEY or not account.isprintable():
            raise _Reject(
                json_error(request, 400, "bad_account_key", "accountKey is too long or unprintable")
            )
        return role, account

    def _limits(self, role: str) -> tuple[int, float]:
        if role == "admin":
            return self.settings.admin_limit, self.settings.admin_window
        return self.settings.customer_limit, self.settings.customer_window

    def _limited(
        self, request: web.Request, role: str, account: str, decision: Decision
    ) -> _Reject:
        period = "24-hour" if role == "admin" else "30-day"
        return _Reject(
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

    def _reserve(self, request: web.Request, attempt: _Attempt) -> None:
        role, account = self._identity(request, attempt)
        key = self._key(request, role, account)
        if attempt.decision is not None:
            if attempt.decision.key == key:
                return
            self.limiter.release(attempt.decision.reservation)
            attempt.decision = None
        decision = self.limiter.reserve(key, *self._limits(role))
        attempt.role, attempt.account = role, account
        if not decision.allowed:
            raise self._limited(request, role, account, decision)
        attempt.decision = decision

    def _peek_limit(self, request: web.Request) -> None:
        """For ``Expect: 100-continue`` with identity headers: refuse a spent budget early."""
        role, account = self._identity(request, _Attempt())
        decision = self.limiter.peek(self._key(request, role, account), *self._limits(role))
        if not decision.allowed:
            raise self._limited(request, role, account, decision)

    # -- the body ----------------------------------------------------------------------------

    async def _read_field(self, request: web.Request, part: BodyPartReader, cap: int) -> str:
        data = bytearray()
        while True:
            chunk = await part.read_chunk(CHUNK)
            if not chunk:
                break
            data += chunk
            if len(data) > cap:
                raise _Reject(
                    json_error(
                        request, 400, "field_too_large", f"form field {part.name!r} too long"
                    )
                )
        return data.decode("utf-8", "replace")

    async def _stream_file(
        self, request: web.Request, part: BodyPartReader, attempt: _Attempt
    ) -> None:
        max_bytes = self.settings.max_bytes
        head = bytearray()
        at_eof = False
        while len(head) < SNIFF_BYTES and b"\n" not in head:
            chunk = await part.read_chunk(SNIFF_BYTES)
            if not chunk:
                at_eof = True
                break
            head += chunk
        ok, why = looks_like_csv(bytes(head[:SNIFF_BYTES]), at_eof)
        if not ok:
            raise _Reject(json_error(request, 400, "not_csv", f"not a CSV upload: {why}"))

        tmp = self.settings.inbox / filenames.temp_name()
        attempt.tmp = tmp
        self.partial_files.add(tmp)
        attempt.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        digest = hashlib.sha256()
        size = 0
        chunk = bytes(head)
        while chunk:
            size += len(chunk)
            if size > max_bytes:
                raise _Reject(
                    json_error(
                        request,
                        413,
                        "file_too_large",
                        f"upload exceeds {max_bytes} bytes",
                        maxBytes=max_bytes,
                    )
                )
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                written = os.write(attempt.fd, view)
                view = view[written:]
            chunk = b"" if at_eof else await part.read_chunk(CHUNK)
        attempt.size = size
        attempt.sha256 = digest.hexdigest()

    async def _receive(self, request: web.Request, attempt: _Attempt) -> None:
        reader = await request.multipart()
        file_seen = False
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise _Reject(json_error(request, 400, "bad_multipart", "nested multipart"))
            if part.name == "file" and not file_seen:
                file_seen = True
                self._reserve(request, attempt)
                attempt.original = filenames.basename(part.filename or "")
                if not filenames.is_csv_name(attempt.original):
                    raise _Reject(
                        json_error(
                            request,
                            415,
                            "unsupported_type",
                            "only CSV uploads are accepted (.csv or .csv.<n>)",
                            originalName=attempt.original[:200],
                        )
                    )
                await self._stream_file(request, part, attempt)
            elif part.name in ("role", "accountKey", "esiid", "meter"):
                attempt.fields[part.name] = await self._read_field(request, part, MAX_FIELD)
            else:
                await self._read_field(request, part, MAX_EXTRA_FIELD)  # ignored, bounded
        if not file_seen:
            raise _Reject(json_error(request, 400, "missing_file", "No file uploaded"))
        self._reserve(request, attempt)  # fields after the file may name another key
        try:
            attempt.esiid = parse_esiid(attempt.fields.get("esiid"))
            attempt.meter = parse_meter(attempt.fields.get("meter"))
        except FieldError as exc:
            raise _Reject(json_error(request, 400, exc.code, exc.message)) from None

    # -- after the body ----------------------------------------------------------------------

    def _posted_digests(self) -> set[str]:
        from .ledger import read_posted_digests  # the ingest pass owns the ledger format

        path = self.settings.state_file
        try:
            st = path.stat()
        except FileNotFoundError:
            return set()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._ledger_key:
            try:
                self._ledger = read_posted_digests(path)
            except OSError as exc:  # LedgerError: store anyway; the ingest pass checks again
                log.warning("cannot read the ledger for duplicate detection: %s", exc)
                return set()
            self._ledger_key = key
        return self._ledger

    def _commit(self, tmp: Path, fd: int, name: str) -> str:
        """fsync the data, link it under a free final name, drop the temp name, fsync the dir."""
        os.fsync(fd)
        inbox = self.settings.inbox
        for n in range(1000):
            candidate = name if n == 0 else filenames.with_counter(name, n)
            try:
                os.link(tmp, inbox / candidate)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # No hard links on this filesystem: check-then-rename under a lock (only this
                # process creates these time-stamped names).
                with self._rename_lock:
                    if os.path.lexists(inbox / candidate):
                        continue
                    os.rename(tmp, inbox / candidate)
            break
        else:
            raise FileExistsError(f"no free name for {name} in {inbox}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        dir_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return candidate

    def _rate_fields(self, attempt: _Attempt) -> dict[str, Any]:
        d = attempt.decision
        assert d is not None
        return {
            "role": attempt.role,
            "accountKey": attempt.account or None,
            "limit": d.limit,
            "remaining": d.remaining,
            "resetAt": iso_utc(d.reset_at),
        }

    async def _finish(self, request: web.Request, attempt: _Attempt) -> web.Response:
        assert attempt.tmp is not None and attempt.fd is not None
        common = {
            "originalName": attempt.original,
            "sizeBytes": attempt.size,
            "sha256": attempt.sha256,
            **self._rate_fields(attempt),
        }
        if attempt.sha256 in self._posted_digests():
            attempt.counted = True
            set_outcome(request, f"duplicate:{attempt.sha256[:12]}")
            return web.json_response(
                {"ok": True, "duplicate": True, "stored": False, "queued": False, **common}
            )
        loop = asyncio.get_running_loop()
        name = filenames.stored_name(attempt.original)
        tmp, fd = attempt.tmp, attempt.fd
        final = await loop.run_in_executor(None, self._commit, tmp, fd, name)
        attempt.tmp = None  # committed: the finally block must not remove it
        attempt.counted = True
        self.partial_files.discard(tmp)
        try:
            queued = await loop.run_in_executor(
                None,
                lambda: spool.enqueue(
                    self.settings.spool_dir,
                    "upload",
                    filename=final,
                    reason="upload",
                    esiid=attempt.esiid,
                    meter=attempt.meter,
                    extra={
                        "sha256": attempt.sha256,
                        "sizeBytes": attempt.size,
                        "role": attempt.role,
                        "accountKey": attempt.account,
                        "originalName": attempt.original[:200],
                    },
                ),
            )
        except spool.SpoolError as exc:
            # The file is stored; the timer's next pass will post it anyway.
            log.error("stored %s but cannot queue an ingest request: %s", final, exc)
            set_outcome(request, f"stored_unqueued:{final}")
            return web.json_response(
                {"ok": True, "stored": True, "queued": False, "filename": final, **common},
                status=202,
            )
        set_outcome(request, f"stored:{final}")
        return web.json_response(
            {
                "ok": True,
                "stored": True,
                "queued": True,
                "id": queued.id,
                "filename": final,
                **common,
            },
            status=202,
        )

    def _cleanup(self, attempt: _Attempt) -> None:
        if attempt.fd is not None:
            with contextlib.suppress(OSError):
                os.close(attempt.fd)
            attempt.fd = None
        if attempt.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                attempt.tmp.unlink()
            self.partial_files.discard(attempt.tmp)
            attempt.tmp = None
        if attempt.decision is not None and not attempt.counted:
            with contextlib.suppress(RateLimitError):
                self.limiter.release(attempt.decision.reservation)

    # -- handlers ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        rejected = self._precheck(request)
        if rejected is not None:
            return rejected
        attempt = _Attempt()
        try:
            if request.headers.get(ROLE_HEADER) or request.headers.get(ACCOUNT_HEADER):
                self._reserve(request, attempt)  # before the body
            await asyncio.wait_for(
                self._receive(request, attempt), timeout=self.settings.body_timeout
            )
            return await self._finish(request, attempt)
        except _Reject as reject:
            return reject.response
        except TimeoutError:
            return json_error(request, 408, "timeout", "the upload took too long")
        except _BODY_ERRORS as exc:
            log.debug("upload from %s cut off: %s", request.remote, exc)
            return json_error(request, 400, "incomplete_body", "the upload was cut off")
        except ValueError as exc:  # aiohttp's multipart parser on a malformed body
            return json_error(request, 400, "bad_multipart", f"malformed multipart body: {exc}")
        except RateLimitError as exc:
            log.error("%s", exc)
            return json_error(request, 503, "limiter_unavailable", "try again later")
        except OSError as exc:  # the inbox: disk full, permissions
            log.error("cannot store upload in %s: %s", self.settings.inbox, exc)
            return json_error(request, 507, "storage_failed", "the upload could not be stored")
        finally:
            self._cleanup(attempt)

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        allowed = self.settings.cors_origin
        if allowed is not None and origin is not None and origin.rstrip("/") != allowed:
            return json_error(request, 403, "origin_not_allowed", "origin not allowed")
        set_outcome(request, "preflight")
        headers = {"Allow": "POST, OPTIONS"}
        if allowed is not None and origin is not None:
            headers.update(
                {
                    "Access-Control-Allow-Methods": "POST, OPTIONS",
                    "Access-Control-Allow-Headers": (
                        f"Content-Type, {TOKEN_HEADER}, {ROLE_HEADER}, {ACCOUNT_HEADER}"
                    ),
                    "Access-Control-Max-Age": "600",
                }
            )
        return web.Response(status=204, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        set_outcome(request, "health")
        return web.json_response(
            {
                "ok": True,
                "service": "smt-upload",
                "maxBytes": self.settings.max_bytes,
                "queueDepth": spool.depth(self.settings.spool_dir),
                "lastIngest": spool.read_last_result(self.settings.spool_dir),
            }
        )

    def _cors(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        allowed = self.settings.cors_origin
        origin = request.headers.get("Origin")
        if allowed is not None and origin is not None and origin.rstrip("/") == allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    @web.middleware
    async def cors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        return self._cors(request, await handler(request))

    def remove_partial_files(self) -> None:
        """Backstop at shutdown: nothing half-written stays in the inbox."""
        for path in list(self.partial_files):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("removed partial upload %s", path.name)
            self.partial_files.discard(path)


def remove_stale_partials(inbox: Path) -> int:
    """Partial files a killed server left behind (only this server writes these names)."""
    removed = 0
    for entry in os.scandir(inbox):
        if filenames.is_temp_name(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def make_app(
    settings: UploadSettings, limiter: RateLimiter, tracker: RequestTracker
) -> tuple[web.Application, UploadService]:
    service = UploadService(settings, limiter)
    app = web.Application(middlewares=[tracker.middleware, service.cors_middleware])
    app.router.add_post("/upload", service.upload, expect_handler=service.expect)
    app.router.add_route("OPTIONS", "/upload", service.preflight)
    app.router.add_get("/health", service.health)
    return app, service


def serve(env: Mapping[str, str]) -> int:
    """Run the upload server until SIGTERM; 2 when the inbox, spool or limiter is unusable."""
    settings = UploadSettings.from_env(env)
    if not settings.inbox.is_dir():
        log.error("SMT_LOCAL_DIR=%s is not a directory", settings.inbox)
        return ExitCode.CONFIG
    try:
        spool.ensure_layout(settings.spool_dir)
        stale = remove_stale_partials(settings.inbox)
        limiter = RateLimiter(settings.state_db)
    except RateLimitError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    except OSError as exc:
        log.error("cannot prepare %s: %s", exc.filename or "the spool", exc.strerror or exc)
        return ExitCode.CONFIG
    if stale:
        log.info("removed %d stale partial upload(s) from %s", stale, settings.inbox)
    tracker = RequestTracker()
    app, service = make_app(settings, limiter, tracker)

    def on_stop() -> None:
        service.remove_partial_files()
        limiter.close()

    return run_app(
        app,
        tracker,
        name="upload-server",
        bind=settings.bind,
        port=settings.port,
        grace=settings.shutdown_grace,
        describe=(
            f"inbox={settings.inbox} spool={settings.spool_dir} max_bytes={settings.max_bytes} "
            f"token={'set' if settings.token else 'unset'} limiter={settings.state_db} "
            f"ledger={settings.state_file}"
        ),
        on_stop=on_stop,
    )
