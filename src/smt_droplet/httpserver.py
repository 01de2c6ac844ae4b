"""What the two front doors (webhook, upload server) share: access log, JSON errors, secret
comparison, and a run loop with a clean SIGTERM.

Written against aiohttp 3.8 (Debian 12's python3-aiohttp) and newer; nothing here needs a later
API. Shutdown on SIGTERM/SIGINT: the listening socket closes first (no new connections), requests
in flight get ``grace`` seconds to finish, then their handlers are cancelled; handlers clean up
their own partial files in ``finally`` blocks, and ``on_stop`` runs last as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import logging
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import spool
from .config import ConnectionLimits
from .connguard import LOOPBACK, ConnectionGuard
from .outcomes import ExitCode
from .passrecord import verdict

log = logging.getLogger("smt_droplet.http")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OUTCOME = "smt_outcome"
BYTES_IN = "smt_bytes_in"


def secrets_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a header value with a configured secret."""
    if given is None:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def json_error(
    request: web.Request,
    status: int,
    error: str,
    message: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """``{"ok": false, "error": CODE, "message": ...}`` and the outcome for the access log."""
    request[OUTCOME] = error
    body: dict[str, Any] = {"ok": False, "error": error, "message": message}
    body.update(extra)
    return web.json_response(body, status=status, headers=headers)


class Reject(Exception):
    """Control flow inside a handler: a check failed; carries the error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# What reading a request body raises when the client sends a broken body or goes away.
BODY_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,  # ClientPayloadError, ClientConnectionError
    HttpProcessingError,  # ContentLengthError, TransferEncodingError
    ConnectionError,
    asyncio.IncompleteReadError,
    EOFError,
)


def spool_writable(spool_dir: Path) -> bool:
    """Whether this process can queue a request (the spool's tmp/ and queue/ are writable)."""
    return all(os.access(spool_dir / sub, os.W_OK | os.X_OK) for sub in ("tmp", "queue"))


def health_response(
    request: web.Request,
    service: str,
    authorized: bool,
    checks: dict[str, bool],
    details: Callable[[], dict[str, Any]],
    *,
    spool_dir: Path,
    stale_after: float,
    min_free_bytes: int = 0,
) -> web.Response:
    """``GET /health``: 503 when this service cannot serve, the disk is below the free-space
    guard (``min_free_bytes``, or the last pass stopped downloading for it), or the ingest needs
    attention (the last pass failed, or no pass succeeded for ``stale_after`` seconds:
    passrecord.verdict). Without credentials only that, and a generic reason; with them also
    ``details()``, each check and the exact reason. Nothing about the box leaks to strangers;
    never cached."""
    last = spool.read_last_result(spool_dir)
    ingest = verdict(last, stale_after)
    checks = {**checks, "disk": _disk_ok(spool_dir, min_free_bytes, last), "ingest": not ingest}
    ok = all(checks.values())
    set_outcome(request, "health" if ok else "health_degraded")
    body: dict[str, Any] = {"ok": ok, "service": service}
    if not ok:
        body["reason"] = "the droplet needs attention"
    if authorized:
        body.update(details())
        body["lastIngest"] = last
        body["checks"] = checks
        failed = [name for name, good in checks.items() if not good and name != "ingest"]
        reasons = [*(f"{name} check failed" for name in failed), *([ingest] if ingest else [])]
        if reasons:
            body["reason"] = "; ".join(reasons)
    return web.json_response(body, status=200 if ok else 503, headers={"Cache-Control": "no-store"})


def _disk_ok(spool_dir: Path, min_free_bytes: int, last: dict[str, Any] | None) -> bool:
    """Above the free-space guard: this server's own floor, and the last pass's (it skipped
    downloads for lack of space)."""
    if last and int(last.get("skipped_no_space") or 0) > 0:
        return False
    if min_free_bytes <= 0:
        return True
    try:
        return shutil.disk_usage(spool_dir).free >= min_free_bytes
    except OSError:
        return False


def client_address(request: web.Request) -> str:
    """The client's address. Behind the TLS front every connection comes from loopback; there
    (and only there) the last ``X-Forwarded-For`` entry is the client's — Caddy writes it and
    drops what an untrusted client sent — so budgets and caps apply per real client."""
    remote = request.remote or "unknown"
    if remote in LOOPBACK:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded:
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(forwarded))
    return remote


def metrics_response(request: web.Request, metrics: Any, authorized: bool) -> web.Response:
    """``GET /metrics``: for loopback clients not proxied by the TLS front, or with the
    service's credentials; 404 when ``prometheus_client`` is missing."""
    direct = request.remote in LOOPBACK and "X-Forwarded-For" not in request.headers
    if not (direct or authorized):
        return json_error(request, 403, "forbidden", "metrics are for loopback or the token")
    if metrics is None:
        return json_error(request, 404, "no_metrics", "python3-prometheus-client is missing")
    set_outcome(request, "metrics")
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def set_outcome(request: web.Request, outcome: str, bytes_in: int | None = None) -> None:
    request[OUTCOME] = outcome
    if bytes_in is not None:
        request[BYTES_IN] = bytes_in


def _printable(text: str, limit: int = 200) -> str:
    text = text[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def log_access(request: web.Request, status: int | str, out_bytes: int, started: float) -> None:
    """One line per request: method, path, status, bytes in/out, client, outcome, duration."""
    log.info(
        "%s %s %s in=%d out=%d client=%s outcome=%s %.1fms",
        request.method,
        _printable(request.rel_url.raw_path),
        status,
        request.get(BYTES_IN) or getattr(request.content, "total_bytes", 0),
        out_bytes,
        client_address(request) if request.remote else "-",
        request.get(OUTCOME, "-"),
        (time.monotonic() - started) * 1000.0,
    )


class RequestTracker:
    """Access log and in-flight accounting for one app; used by :func:`run_app` to drain.

    aiohttp's own shutdown stops reading from connections at once (and 3.8 cancels handlers
    immediately), so an upload whose body is still arriving could never finish. The run loop
    therefore closes the listening socket first, waits until no request is in flight (or the
    grace period ends), and only then lets aiohttp close what is left.
    """

    def __init__(self, metrics: Any = None, max_per_client: int = 64) -> None:
        self.active = 0
        self.max_per_client = max_per_client  # requests in flight per client behind the front
        self._forwarded: Counter[str] = Counter()
        self.draining = False
        self._idle: asyncio.Event | None = None
        self.metrics = metrics  # servermetrics.ServerMetrics or None

    def _observe(self, request: web.Request, status: int | str) -> None:
        if self.metrics is None:
            return
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        bytes_in = request.get(BYTES_IN) or getattr(request.content, "total_bytes", 0)
        self.metrics.observe(route, status, str(request.get(OUTCOME, "")), int(bytes_in or 0))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        if self.draining:
            request[OUTCOME] = "shutting_down"
            response = web.json_response(
                {"ok": False, "error": "shutting_down"}, status=503, headers={"Retry-After": "5"}
            )
            response.force_close()
            log_access(request, 503, response.content_length or 0, started)
            self._observe(request, 503)
            return response
        client = client_address(request)
        forwarded = client != (request.remote or "unknown")
        if forwarded and self._forwarded[client] >= self.max_per_client:
            # the connection cap cannot see clients behind the front (every connection is the
            # front's): their requests in flight are capped here instead
            request[OUTCOME] = "too_many_requests"
            response = json_error(
                request, 429, "too_many_requests", "too many requests in flight from this client"
            )
            log_access(request, 429, response.content_length or 0, started)
            self._observe(request, 429)
            return response
        self.active += 1
        self._forwarded[client] += forwarded
        try:
            return await self._logged(request, handler, started)
        finally:
            self.active -= 1
            if forwarded:
                self._forwarded[client] -= 1
                if self._forwarded[client] <= 0:
                    del self._forwarded[client]
            if self.active == 0 and self._idle is not None:
                self._idle.set()

    async def _logged(
        self, request: web.Request, handler: Handler, started: float
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
            request.setdefault(OUTCOME, exc.reason.lower().replace(" ", "_"))
            log_access(request, exc.status, len(exc.text or ""), started)
            self._observe(request, exc.status)
            raise
        except asyncio.CancelledError:
            request.setdefault(OUTCOME, "cancelled")
            log_access(request, "-", 0, started)
            self._observe(request, "cancelled")
            raise
        except Exception:
            log.exception("%s %s: unexpected error", request.method, request.rel_url.raw_path)
            request[OUTCOME] = "internal_error"
            response = web.json_response({"ok": False, "error": "internal_error"}, status=500)
        log_access(request, response.status, response.content_length or 0, started)
        self._observe(request, response.status)
        return response

    async def drain(self, grace: float) -> bool:
        """Refuse new requests and wait up to ``grace`` s for those in flight; True if idle."""
        self.draining = True
        if self.active == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            return False
        return True


def _runner_and_site_kwargs(grace: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """``shutdown_timeout`` moved from TCPSite (3.8) to AppRunner (3.9+)."""
    runner_params = inspect.signature(web.BaseRunner.__init__).parameters
    if "shutdown_timeout" in runner_params:
        return {"shutdown_timeout": grace}, {}
    return {}, {"shutdown_timeout": grace}


class _GuardedServer:
    """aiohttp's ``Server`` (the protocol factory), each connection passed through the guard."""

    def __init__(self, server: Any, guard: ConnectionGuard) -> None:
        self._server = server
        self._factory = guard.wrap(server)

    def __call__(self) -> asyncio.Protocol:
        return self._factory()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _GuardedRunner(web.AppRunner):
    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> Any:
        return _GuardedServer(await super()._make_server(), self.guard)


async def _serve(
    app: web.Application,
    tracker: RequestTracker,
    name: str,
    bind: str,
    port: int,
    grace: float,
    describe: str,
    on_stop: Callable[[], None] | None,
    limits: ConnectionLimits,
) -> int:
    runner_kw, site_kw = _runner_and_site_kwargs(min(grace, 1.0))
    runner = _GuardedRunner(
        app,
        ConnectionGuard(limits),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=limits.keepalive_timeout,
        **runner_kw,
    )
    await runner.setup()
    site = web.TCPSite(runner, bind, port, reuse_address=True, **site_kw)
    try:
        await site.start()
    except OSError as exc:
        log.error("%s: cannot listen on %s:%d: %s", name, bind, port, exc.strerror or exc)
        await runner.cleanup()
        return ExitCode.RETRY
    addresses = runner.addresses
    actual_port = addresses[0][1] if addresses else port
    log.info("%s listening on http://%s:%d %s", name, bind, actual_port, describe)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def _on_signal(signame: str) -> None:
        received.append(signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig.name)
    try:
        await stop.wait()
        log.info(
            "%s: %s received, draining %d request(s) in flight (grace %.1fs)",
            name,
            received[0],
            tracker.active,
            grace,
        )
        listener = getattr(site, "_server", None)  # asyncio.Server: stop accepting first
        if listener is not None:
            listener.close()
        if not await tracker.drain(grace):
            log.warning("%s: %d request(s) still in flight; cancelling", name, tracker.active)
        try:
            # Bounded: some aiohttp/Python pairs wait for idle keep-alive connections here.
            await asyncio.wait_for(runner.cleanup(), timeout=10.0)
        except TimeoutError:
            log.warning("%s: shutdown did not finish in time; exiting anyway", name)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if on_stop is not None:
            on_stop()
    log.info("%s stopped", name)
    return ExitCode.OK


def run_app(
    app: web.Application,
    tracker: RequestTracker,
    *,
    name: str,
    bind: str,
    port: int,
    grace: float,
    describe: str = "",
    on_stop: Callable[[], None] | None = None,
    limits: ConnectionLimits | None = None,
) -> int:
    """Serve ``app`` until SIGTERM/SIGINT; returns the process exit code (0 after a clean stop).
    Every connection goes through a :class:`~smt_droplet.connguard.ConnectionGuard`."""
    limits = limits or ConnectionLimits()
    tracker.max_per_client = limits.max_per_client
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(app, tracker, name, bind, port, grace, describe, on_stop, limits))
    return ExitCode.OK
