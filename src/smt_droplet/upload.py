"""``smt-droplet upload-server``: ``POST /upload`` stores one CSV in the inbox and queues ingest.

Order of checks, cheapest and safest first, so a rejected request never writes a byte:

1. ``x-smt-upload-token`` (when ``SMT_UPLOAD_TOKEN`` is set; constant time) → 401;
   ``Content-Length`` beyond the cap → 413; not ``multipart/form-data`` → 415. With
   ``Expect: 100-continue`` these run before the client even sends the body.
2. The rate limit (:mod:`smt_droplet.upload_limits`) → 429, before the file's first byte.
3. The file part: the name must be CSV-like (``.csv``, ``.csv.<n>``) → else 415; then it is
   sniffed and streamed to a partial file (:mod:`smt_droplet.upload_store`) → 400 / 413.
4. A digest already in the ledger → 200 ``duplicate``, nothing stored or queued. Otherwise the
   partial file is committed into the inbox and a spool request queued (fsynced) → 202.

Optional form fields ``esiid`` (17 digits) and ``meter`` travel with the spool request and become
that file's attribution default in the ingest pass (the file's own ESIID still wins).

Every failure path removes the partial file (``finally``), including a client that disconnects
mid-body and a SIGTERM that outlasts the shutdown grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web, web_urldispatcher

from . import filenames, spool
from .config import UploadSettings
from .esiid import FieldError, parse_esiid, parse_meter
from .httpserver import (
    BODY_ERRORS,
    Reject,
    RequestTracker,
    health_response,
    json_error,
    log_access,
    metrics_response,
    run_app,
    secrets_equal,
    set_outcome,
    spool_writable,
)
from .outcomes import ExitCode
from .page import OperatorPage
from .ratelimit import RateLimiter, RateLimitError
from .servermetrics import new_metrics
from .upload_limits import (
    TICKET_HEADER,
    TOKEN_HEADER,
    Reservation,
    UploadLimits,
)
from .upload_store import CHUNK, InboxStore, Partial, remove_stale_partials

log = logging.getLogger("smt_droplet.upload")

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the file itself
MAX_FIELD = 256
MAX_EXTRA_FIELD = 64 * 1024

_default_expect_handler = web_urldispatcher._default_expect_handler

# What a cut-off or malformed body raises from aiohttp's readers (3.8 and later).


@dataclass
class _Attempt:
    """Per-request state the cleanup in ``finally`` needs."""

    slot: Reservation = field(default_factory=Reservation)
    partial: Partial | None = None
    original: str = ""
    esiid: str | None = None
    meter: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    field_bytes: int = 0  # every form field's bytes, kept or ignored: they count against the cap


class UploadService:
    """The handlers: checks before the body, the multipart body, the answer."""

    def __init__(self, settings: UploadSettings, limiter: RateLimiter) -> None:
        self.settings = settings
        self.limits = UploadLimits(settings, limiter)
        self.store = InboxStore(settings)
        self._reserved = 0  # bytes the uploads in flight may still write (free-space guard)
        self._uploading = 0  # uploads in flight (SMT_UPLOAD_MAX_CONCURRENT)

    # -- checks before the body ------------------------------------------------------------

    def _precheck(self, request: web.Request) -> web.Response | None:
        token = self.settings.token
        if (
            token is not None
            and not self.limits.authenticates(request)  # a ticket: verified with the identity
            and not secrets_equal(request.headers.get(TOKEN_HEADER), token)
        ):
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
        if self._uploading >= self.settings.max_concurrent:
            return json_error(
                request,
                503,
                "busy",
                f"{self._uploading} uploads in flight; try again shortly",
                headers={"Retry-After": "10"},
            )
        return self._space_check(request)

    def _claim(self, request: web.Request) -> int:
        """What an upload may write: its declared length, or the cap for a chunked body."""
        return request.content_length or self.settings.max_bytes + MULTIPART_SLACK

    def _space_check(self, request: web.Request) -> web.Response | None:
        """507 before the body when the upload, counted with every upload still in flight (their
        declared lengths, or the cap), would leave less than ``SMT_MIN_FREE_MB`` free (the same
        threshold that stops the pass's downloads)."""
        floor = self.settings.min_free_bytes
        if not floor:
            return None
        try:
            free = shutil.disk_usage(self.settings.inbox).free
        except OSError:
            return None  # storing will fail and say why
        if free - self._reserved - self._claim(request) < floor:
            log.error(
                "upload refused: %d MiB free on %s, SMT_MIN_FREE_MB=%d",
                free // 2**20,
                self.settings.inbox,
                floor // 2**20,
            )
            return json_error(
                request, 507, "insufficient_storage", "the droplet is short of disk space"
            )
        return None

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse before the client sends a byte of the body."""
        started = time.monotonic()
        rejected = self._precheck(request)
        if rejected is None:
            try:
                self.limits.peek(request)
            except Reject as reject:
                rejected = reject.response
            except RateLimitError as exc:
                log.error("%s", exc)  # the handler answers 503 after 100-continue
        if rejected is not None:
            rejected.force_close()
            log_access(request, rejected.status, rejected.content_length or 0, started)
            return self._cors(request, rejected)
        await _default_expect_handler(request)  # 100 Continue
        return None

    # -- the body ----------------------------------------------------------------------------

    async def _read_field(
        self, request: web.Request, part: BodyPartReader, cap: int, attempt: _Attempt
    ) -> str:
        data = bytearray()
        while True:
            chunk = await part.read_chunk(CHUNK)
            if not chunk:
                break
            data += chunk
            attempt.field_bytes += len(chunk)
            self._check_body_cap(request, attempt)
            if len(data) > cap:
                raise Reject(
                    json_error(
                        request, 400, "field_too_large", f"form field {part.name!r} too long"
                    )
                )
        return data.decode("utf-8", "replace")

    async def _receive(self, request: web.Request, attempt: _Attempt) -> None:
        reader = await request.multipart()
        file_seen = False
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise Reject(json_error(request, 400, "bad_multipart", "nested multipart"))
            if part.name == "file" and not file_seen:
                file_seen = True
                await self._receive_file(request, part, attempt)
            elif part.name in ("esiid", "meter"):  # role/accountKey come from the ticket only
                attempt.fields[part.name] = await self._read_field(
                    request, part, MAX_FIELD, attempt
                )
            else:
                await self._read_field(request, part, MAX_EXTRA_FIELD, attempt)  # ignored
        if not file_seen:
            raise Reject(json_error(request, 400, "missing_file", "No file uploaded"))
        try:
            attempt.esiid = parse_esiid(attempt.fields.get("esiid"))
            attempt.meter = parse_meter(attempt.fields.get("meter"))
        except FieldError as exc:
            raise Reject(json_error(request, 400, exc.code, exc.message)) from None

    def _check_body_cap(self, request: web.Request, attempt: _Attempt) -> None:
        """The whole body (file and every field, even chunked ones) stays under the cap."""
        size = attempt.field_bytes + (attempt.partial.size if attempt.partial else 0)
        if size > self.settings.max_bytes + MULTIPART_SLACK:
            raise Reject(
                json_error(
                    request,
                    413,
                    "body_too_large",
                    f"the request body exceeds {self.settings.max_bytes} bytes",
                    maxBytes=self.settings.max_bytes,
                )
            )

    async def _receive_file(
        self, request: web.Request, part: BodyPartReader, attempt: _Attempt
    ) -> None:
        attempt.original = filenames.basename(part.filename or "")
        if not filenames.is_csv_name(attempt.original):
            raise Reject(
                json_error(
                    request,
                    415,
                    "unsupported_type",
                    "only CSV uploads are accepted (.csv or .csv.<n>)",
                    originalName=attempt.original[:200],
                )
            )
        room = self.settings.max_bytes + MULTIPART_SLACK - attempt.field_bytes
        ticket_cap = attempt.slot.identity.max_bytes if attempt.slot.identity else None
        if ticket_cap is not None:
            room = min(room, ticket_cap)
        attempt.partial = await self.store.receive(request, part, room)

    # -- after the body ----------------------------------------------------------------------

    async def _finish(self, request: web.Request, attempt: _Attempt) -> web.Response:
        partial = attempt.partial
        assert partial is not None
        common = {
            "originalName": attempt.original,
            "sizeBytes": partial.size,
            "sha256": partial.sha256,
            **attempt.slot.rate_fields(),
        }
        if self.store.is_posted(partial.sha256):
            attempt.slot.counted = True
            set_outcome(request, f"duplicate:{partial.sha256[:12]}")
            return web.json_response(
                {"ok": True, "duplicate": True, "stored": False, "queued": False, **common}
            )
        waiting = self.store.unposted_copy(partial.sha256)
        if waiting is not None:  # the same bytes are stored and not posted yet: keep one copy
            attempt.slot.counted = True
            set_outcome(request, f"duplicate_waiting:{waiting}")
            waiting_answer = {"ok": True, "duplicate": True, "stored": False, "queued": False}
            return web.json_response({**waiting_answer, "filename": waiting, **common})
        loop = asyncio.get_running_loop()
        final = await loop.run_in_executor(
            None, self.store.commit, partial, filenames.stored_name(attempt.original)
        )
        attempt.slot.counted = True
        self.store.stored.remember(partial.sha256, final)
        try:
            queued = await loop.run_in_executor(None, self._enqueue, attempt, final)
        except spool.SpoolError as exc:
            # The file is stored; the timer's next pass will post it anyway.
            log.error("stored %s but cannot queue an ingest request: %s", final, exc)
            set_outcome(request, f"stored_unqueued:{final}")
            return web.json_response(
                {"ok": True, "stored": True, "queued": False, "filename": final, **common},
                status=202,
            )
        set_outcome(request, f"stored:{final}")
        stored = {"ok": True, "stored": True, "queued": True, "id": queued.id, "filename": final}
        return web.json_response({**stored, **common}, status=202)

    def _enqueue(self, attempt: _Attempt, final: str) -> spool.Request:
        assert attempt.partial is not None
        return spool.enqueue(
            self.settings.spool_dir,
            "upload",
            filename=final,
            reason="upload",
            esiid=attempt.esiid,
            meter=attempt.meter,
            extra={
                "sha256": attempt.partial.sha256,
                "sizeBytes": attempt.partial.size,
                "role": attempt.slot.identity.role if attempt.slot.identity else None,
                "accountKey": attempt.slot.identity.account if attempt.slot.identity else None,
                "originalName": attempt.original[:200],
            },
        )

    def _cleanup(self, attempt: _Attempt) -> None:
        self.store.discard(attempt.partial)
        self.limits.release_unless_counted(attempt.slot)

    # -- handlers ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        rejected = self._precheck(request)
        if rejected is not None:
            return rejected
        attempt = _Attempt()
        claim = self._claim(request)  # no await since the space check: held from here on
        self._reserved += claim
        self._uploading += 1
        try:
            self.limits.reserve(request, attempt.slot)  # before the body
            await asyncio.wait_for(
                self._receive(request, attempt), timeout=self.settings.body_timeout
            )
            return await self._finish(request, attempt)
        except Reject as reject:
            return reject.response
        except TimeoutError:
            return json_error(request, 408, "timeout", "the upload took too long")
        except BODY_ERRORS as exc:
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
            self._reserved -= claim
            self._uploading -= 1
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
                        f"Content-Type, {TOKEN_HEADER}, {TICKET_HEADER}"
                    ),
                    "Access-Control-Max-Age": "600",
                }
            )
        return web.Response(status=204, headers=headers)

    def _token_ok(self, request: web.Request) -> bool:
        token = self.settings.token
        return token is not None and secrets_equal(request.headers.get(TOKEN_HEADER), token)

    def metrics(self, tracker: RequestTracker) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return metrics_response(request, tracker.metrics, self._token_ok(request))

        return handler

    async def health(self, request: web.Request) -> web.Response:
        settings = self.settings
        authorized = self._token_ok(request)
        checks = {
            "spool": spool_writable(settings.spool_dir),
            "inbox": os.access(settings.inbox, os.W_OK | os.X_OK),
            "limiter": self.limits.limiter.usable(),
        }
        return health_response(
            request,
            "smt-upload",
            authorized,
            checks,
            lambda: {
                "maxBytes": settings.max_bytes,
                "queueDepth": spool.depth(settings.spool_dir),
            },
            spool_dir=settings.spool_dir,
            stale_after=settings.stale_after,
            min_free_bytes=settings.min_free_bytes,
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
        """Only ``/upload`` is for another origin (the app's form); the page's API is not."""
        response = await handler(request)
        return self._cors(request, response) if request.path == "/upload" else response


def make_app(
    settings: UploadSettings, limiter: RateLimiter, tracker: RequestTracker
) -> tuple[web.Application, UploadService]:
    service = UploadService(settings, limiter)
    page = OperatorPage(settings)
    app = web.Application(middlewares=[tracker.middleware, page.guard, service.cors_middleware])
    page.add_routes(app)  # GET / and /api/v1/ (smt_droplet.page)
    app.router.add_post("/upload", service.upload, expect_handler=service.expect)
    app.router.add_route("OPTIONS", "/upload", service.preflight)
    app.router.add_get("/health", service.health)
    app.router.add_get("/metrics", service.metrics(tracker))
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
    tracker = RequestTracker(new_metrics("smt-upload", lambda: spool.depth(settings.spool_dir)))
    app, service = make_app(settings, limiter, tracker)

    def on_stop() -> None:
        service.store.remove_partial_files()
        limiter.close()

    return run_app(
        app,
        tracker,
        name="upload-server",
        bind=settings.bind,
        port=settings.port,
        grace=settings.shutdown_grace,
        limits=settings.limits,
        describe=(
            f"inbox={settings.inbox} spool={settings.spool_dir} max_bytes={settings.max_bytes} "
            f"token={'set' if settings.token else 'unset'} limiter={settings.state_db} "
            f"ledger={settings.state_file}"
        ),
        on_stop=on_stop,
    )
