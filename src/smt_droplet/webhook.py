"""``smt-droplet webhook-server``: ``POST /trigger/smt-now`` queues one ingest pass.

The web app calls this to make the droplet pull from SMT now. The server never runs the ingest:
it validates the caller and the JSON body, writes one request into the spool (fsynced) and
answers 202 within milliseconds; ``smt-ingest.path`` starts the pass. Nothing from the request
reaches a shell; the request fields travel only as JSON in the spool file.

Auth: one of ``x-intelliwatt-secret``, ``x-smt-secret``, ``x-webhook-secret`` equal to
``INTELLIWATT_WEBHOOK_SECRET`` (constant time). With ``SMT_WEBHOOK_SIGNATURE=accept`` a caller
may instead sign (Standard Webhooks, or the own ``x-smt-signature`` scheme:
:mod:`smt_droplet.signatures`), within ``SMT_WEBHOOK_SIGNATURE_WINDOW`` (at most 300) seconds of
the server's clock in both directions, each delivery once (a replay is 409, also after a
restart: ``SMT_WEBHOOK_STATE``); ``require`` makes the signature mandatory. During a secret
rotation ``INTELLIWATT_WEBHOOK_SECRET_PREVIOUS`` is accepted for signatures too.

The queue cap (``SMT_WEBHOOK_MAX_QUEUED``) counts the requests in the spool plus those being
accepted right now, so concurrent triggers cannot overshoot it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import spool
from .config import WebhookSettings
from .esiid import FieldError, parse_esiid, parse_meter
from .httpserver import (
    BODY_ERRORS,
    RequestTracker,
    client_address,
    health_response,
    json_error,
    metrics_response,
    run_app,
    secrets_equal,
    set_outcome,
    spool_writable,
)
from .outcomes import ExitCode
from .servermetrics import new_metrics
from .signatures import (
    ReplayGuard,
    ReplayStoreError,
    SignatureError,
    Verified,
    verify,
)

log = logging.getLogger("smt_droplet.webhook")

SECRET_HEADERS = ("x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret")
SIGNATURE_HEADERS = ("x-smt-signature", "webhook-signature")
MAX_REASON = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Trigger:
    """A validated ``/trigger/smt-now`` body."""

    reason: str | None = None
    esiid: str | None = None
    meter: str | None = None
    force_repost: bool = False


TriggerError = FieldError  # a body field is not acceptable; ``code`` goes into the 400


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def parse_trigger(body: bytes) -> Trigger:
    """Validate the optional JSON body ``{reason, esiid, meter, forceRepost}``.

    An empty body is a plain trigger. Unknown fields are ignored. ``esiid`` and ``meter`` follow
    :mod:`smt_droplet.esiid` (17 digits as a string or an integer; a short meter id);
    ``forceRepost`` must be a JSON boolean; ``reason`` is free text, cut to 200 characters with
    control characters removed.
    """
    if body.strip() == b"":
        return Trigger()
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TriggerError("bad_json", "body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise TriggerError("bad_json", "body must be a JSON object")

    raw_reason = data.get("reason")
    if _blank(raw_reason):
        reason = None
    elif isinstance(raw_reason, str):
        reason = _CONTROL.sub(" ", raw_reason.strip())[:MAX_REASON]
    else:
        raise TriggerError("bad_reason", "reason must be a string")

    esiid = parse_esiid(data.get("esiid"))
    meter = parse_meter(data.get("meter"))

    force = data.get("forceRepost")
    if force is None:
        force = False
    elif not isinstance(force, bool):
        raise TriggerError("bad_force_repost", "forceRepost must be true or false")
    return Trigger(reason=reason, esiid=esiid, meter=meter, force_repost=force)


class WebhookService:
    """The handlers; holds the settings, the replay memory and the in-flight queue slots."""

    def __init__(
        self,
        settings: WebhookSettings,
        clock: Any = time.time,
        replay: ReplayGuard | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._replay = replay
        self._in_flight = 0  # accepted triggers not yet written to the spool

    def _secret_ok(self, request: web.Request) -> bool:
        ok = False
        for name in SECRET_HEADERS:
            # Compare every present header (no early exit that would time the header order).
            ok |= secrets_equal(request.headers.get(name), self.settings.secret)
        return ok

    def _verify(self, request: web.Request, body: bytes) -> Verified:
        """A valid, fresh, first-time signature, or :class:`SignatureError`."""
        verified = verify(
            request.headers,
            body,
            self.settings.secrets,
            self._clock(),
            self.settings.signature_window,
        )
        if verified is None:
            raise SignatureError("no signature")
        if self._replay is not None and not self._replay.first_time(verified.delivery):
            raise ReplayedError("this delivery was already accepted")
        return verified

    async def _read_capped(self, request: web.Request) -> bytes | None:
        """The body, or ``None`` as soon as it exceeds the cap (the rest is not read)."""
        cap = self.settings.max_body_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await request.content.read(16384)
            if not chunk:
                break
            total += len(chunk)
            set_outcome(request, "reading", total)
            if total > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _queue_full(self, request: web.Request) -> web.Response | None:
        """429 when the queue (written plus in flight) is at the cap; else take a slot. No await
        between the check and the taking: concurrent triggers cannot overshoot the cap."""
        queued = spool.depth(self.settings.spool_dir) + self._in_flight
        if queued >= self.settings.max_queued:
            return json_error(
                request,
                429,
                "queue_full",
                f"{queued} ingest requests already queued; try again later",
                headers={"Retry-After": str(self.settings.retry_after)},
                queued=queued,
            )
        self._in_flight += 1
        return None

    async def trigger(self, request: web.Request) -> web.Response:
        """Credentials and the whole body (under ``body_timeout``) first, the signature, the
        JSON, and only then a queue slot: a stalled or unsigned body never holds one."""
        mode = self.settings.signature
        secret_ok = self._secret_ok(request) and mode != "require"
        signed = any(h in request.headers for h in SIGNATURE_HEADERS)
        if not secret_ok and (mode == "off" or not signed):
            return json_error(request, 401, "unauthorized", "missing or wrong webhook secret")
        cap = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > cap:
            return json_error(request, 413, "body_too_large", f"body exceeds {cap} bytes")
        try:
            body = await asyncio.wait_for(
                self._read_capped(request), timeout=self.settings.body_timeout
            )
        except TimeoutError:
            return json_error(request, 408, "timeout", "the request body took too long")
        except BODY_ERRORS as exc:  # the client went away mid-body: one line, no traceback
            log.debug("trigger from %s cut off: %s", request.remote, exc)
            return json_error(request, 400, "incomplete_body", "the request body was cut off")
        if body is None:
            return json_error(request, 413, "body_too_large", f"body exceeds {cap} bytes")
        verified: Verified | None = None
        if not secret_ok:
            try:
                verified = self._verify(request, body)
            except ReplayedError as exc:
                return json_error(request, 409, "replayed", str(exc))
            except SignatureError as exc:
                return json_error(request, 401, "unauthorized", f"bad or expired signature: {exc}")
            except ReplayStoreError as exc:
                log.error("%s", exc)
                return json_error(request, 503, "replay_memory_unavailable", "try again later")
        try:
            trigger = parse_trigger(body)
        except TriggerError as exc:
            self._forget(verified)
            return json_error(request, 400, exc.code, exc.message)
        full = self._queue_full(request)
        if full is not None:
            self._forget(verified)  # not queued: the sender may deliver it again
            return full
        try:
            return await self._queue(request, trigger, verified)
        finally:
            self._in_flight -= 1

    async def _queue(
        self, request: web.Request, trigger: Trigger, verified: Verified | None
    ) -> web.Response:
        try:
            queued = await asyncio.get_running_loop().run_in_executor(
                None, self._enqueue, trigger, client_address(request)
            )
        except spool.SpoolError as exc:
            log.error("cannot queue ingest request: %s", exc)
            self._forget(verified)
            return json_error(request, 503, "spool_unavailable", "cannot queue the request")
        set_outcome(request, f"queued:{queued.id}")
        return web.json_response({"ok": True, "queued": True, "id": queued.id}, status=202)

    def _enqueue(self, trigger: Trigger, client: str) -> spool.Request:
        return spool.enqueue(
            self.settings.spool_dir,
            "webhook",
            reason=trigger.reason,
            esiid=trigger.esiid,
            meter=trigger.meter,
            force_repost=trigger.force_repost,
            extra={"client": client},
        )

    def _forget(self, verified: Verified | None) -> None:
        """A signed delivery that was not queued may be sent again."""
        if verified is not None and self._replay is not None:
            try:
                self._replay.forget(verified.delivery)
            except ReplayStoreError as exc:
                log.error("%s", exc)

    async def health(self, request: web.Request) -> web.Response:
        settings = self.settings
        return health_response(
            request,
            "smt-webhook",
            self._secret_ok(request),
            {"spool": spool_writable(settings.spool_dir)},
            lambda: {
                "queueDepth": spool.depth(settings.spool_dir),
            },
            spool_dir=settings.spool_dir,
            stale_after=settings.stale_after,
        )


class ReplayedError(SignatureError):
    """A valid signature of a delivery that was already accepted."""


def make_app(
    settings: WebhookSettings, tracker: RequestTracker, replay: ReplayGuard | None = None
) -> web.Application:
    service = WebhookService(settings, replay=replay)
    # client_max_size backs up the streaming cap for anything that calls request.read().
    app = web.Application(middlewares=[tracker.middleware], client_max_size=settings.max_body_bytes)
    app.router.add_post("/trigger/smt-now", service.trigger)
    app.router.add_get("/health", service.health)

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(request, tracker.metrics, service._secret_ok(request))

    app.router.add_get("/metrics", metrics)
    return app


def serve(env: Mapping[str, str]) -> int:
    """Run the webhook until SIGTERM. ConfigError (no secret, bad port) → exit 2 via the CLI."""
    settings = WebhookSettings.from_env(env)
    try:
        spool.ensure_layout(settings.spool_dir)
    except OSError as exc:
        log.error("spool %s is not usable: %s", settings.spool_dir, exc.strerror or exc)
        return ExitCode.CONFIG
    replay: ReplayGuard | None = None
    if settings.signature != "off":
        try:
            replay = ReplayGuard(settings.state_file, settings.signature_window)
        except ReplayStoreError as exc:
            log.error("%s", exc)
            return ExitCode.CONFIG
    tracker = RequestTracker(new_metrics("smt-webhook", lambda: spool.depth(settings.spool_dir)))
    return run_app(
        make_app(settings, tracker, replay),
        tracker,
        name="webhook-server",
        bind=settings.bind,
        port=settings.port,
        grace=settings.shutdown_grace,
        limits=settings.limits,
        describe=(
            f"spool={settings.spool_dir} max_queued={settings.max_queued} "
            f"signature={settings.signature}"
        ),
    )
