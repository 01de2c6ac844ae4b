"""Connection-level limits for the servers, enforced on their own (with or without the TLS proxy).

aiohttp bounds a request's size but not the time a client may take to send its header, nor how
many connections one client may hold: a client that sends half a header and goes quiet keeps
its connection forever, and a thousand of them exhaust the process's file descriptors. Every
connection therefore goes through a :class:`ConnectionGuard`:

* **header timeout**: a request header must be complete (``CRLF CRLF`` seen) within
  ``header_timeout`` seconds of the connection opening — or, on a kept-alive connection, of
  the next request's first byte — else the connection is closed;
* **caps**: at most ``max_connections`` open connections in total and ``max_per_client`` per
  client address; a connection over a cap is closed at once, before aiohttp sees it. Loopback
  peers are the TLS front (every client behind it arrives from 127.0.0.1): they count toward
  the total only, and the requests in flight per real client (``X-Forwarded-For``) are capped
  per request instead (:class:`~smt_droplet.httpserver.RequestTracker`);
* what the guard refuses is logged through a flood gate (one client cannot fill the journal).

Once a header is complete the guard steps aside: body time is the handlers' business (the upload
server's ``SMT_UPLOAD_BODY_TIMEOUT``), idle keep-alive is aiohttp's ``keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from .config import ConnectionLimits
from .logsafety import FloodGate

log = logging.getLogger("smt_droplet.http.guard")
_gate = FloodGate(burst=10, interval=10.0)
log.addFilter(_gate)

HEADER_END = b"\r\n\r\n"
LOOPBACK = frozenset({"127.0.0.1", "::1"})  # where the TLS front's connections come from


class ConnectionGuard:
    """Wraps a protocol factory (aiohttp's ``Server``) so each connection is counted and timed."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0  # connections admitted and not yet closed
        self._per_client: Counter[str] = Counter()

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, factory)

    def admit(self, client: str) -> bool:
        if self.open >= self.limits.max_connections:
            log.warning(
                "refused a connection from %s: %d connections open (cap %d)",
                client,
                self.open,
                self.limits.max_connections,
            )
            return False
        if client not in LOOPBACK and self._per_client[client] >= self.limits.max_per_client:
            log.warning(
                "refused a connection from %s: it holds %d already (cap per client %d)",
                client,
                self._per_client[client],
                self.limits.max_per_client,
            )
            return False
        self.open += 1
        self._per_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]


class _GuardedProtocol(asyncio.Protocol):
    """Forwards to the real protocol; refuses over-cap connections; times request headers."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._client = "unknown"
        self._awaiting_header = True
        self._tail = b""  # the last bytes seen, to find CRLF CRLF across chunks
        self._timer: asyncio.TimerHandle | None = None

    # -- the connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if peer else "unknown"
        if not self._guard.admit(self._client):
            transport.abort()
            return
        self._transport = transport
        self._arm()  # the first byte and the whole header within the timeout
        self._inner = self._factory()
        self._inner.connection_made(cast(asyncio.Transport, _ObservedTransport(transport, self)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is None:
            return
        self._guard.release(self._client)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._awaiting_header:
            if self._timer is None:
                self._arm()  # the next request on a kept-alive connection
            window = self._tail + data
            if HEADER_END in window:
                self._awaiting_header = False
                self._tail = b""
                self._disarm()
            else:
                self._tail = window[-(len(HEADER_END) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the header timer -------------------------------------------------------------------

    def response_started(self, first_bytes: bytes) -> None:
        """The server began a response: the next bytes from the client start a new request.
        ``100 Continue`` is not a response (the body follows)."""
        if first_bytes.startswith(b"HTTP/") and first_bytes[9:12] != b"100":
            self._awaiting_header = True
            self._tail = b""

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.header_timeout, self._header_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timed_out(self) -> None:
        self._timer = None
        if self._transport is not None and self._awaiting_header:
            log.info(
                "closed a connection from %s: no complete request header within %gs",
                self._client,
                self._guard.limits.header_timeout,
            )
            self._transport.abort()


class _ObservedTransport:
    """The real transport, with the start of each response reported to the guard."""

    def __init__(self, transport: asyncio.Transport, owner: _GuardedProtocol) -> None:
        self._transport = transport
        self._owner = owner

    def write(self, data: Any) -> None:
        self._owner.response_started(bytes(data[:12]))
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        chunks = list(chunks)
        if chunks:
            self._owner.response_started(bytes(chunks[0][:12]))
        self._transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
