"""No log line of either server ever holds a configured secret, and one client cannot make the
servers flood the journal, whatever it sends (real servers on 127.0.0.1)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from smt_droplet.logsafety import REDACTED, FloodGate, SecretRedactor

WEBHOOK_SECRET = "webhook-SECRET-do-not-log-0123456789abcdef"
UPLOAD_TOKEN = "upload-TOKEN-do-not-log-0123456789abcdef"
PREVIOUS = "previous-SECRET-do-not-log-0123456789abcd"


def malformed_requests(path: str, header: str, secret: str) -> list[bytes]:
    """Requests aiohttp's parser refuses, each quoting the secret somewhere in the bad part."""
    return [
        # a token copied from a CRLF file: a stray CR at the end of the header value
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}: {secret}\r\r\nContent-Length: 0\r\n\r\n",
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{header} {secret}\r\n\r\n",  # no colon
        f"GET /{secret} HTTP/1.1\x00\r\n\r\n",  # bad status line
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}: {secret}\x01\r\n\r\n",  # control char
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {secret}\r\n\r\n",
        f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {secret}\r\n\r\n",
    ]


def send_raw(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        try:
            return sock.recv(200)
        except OSError:
            return b""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, ServerProcess]]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    common = {"SMT_SPOOL_DIR": str(tmp_path / "spool"), "SMT_SHUTDOWN_GRACE": "1"}
    webhook = ServerProcess(
        "webhook-server",
        {
            **common,
            "INTELLIWATT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "INTELLIWATT_WEBHOOK_SECRET_PREVIOUS": PREVIOUS,
            "SMT_WEBHOOK_SIGNATURE": "accept",
            "SMT_WEBHOOK_STATE": str(tmp_path / "wh" / "replay.sqlite3"),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": "0",
        },
        tmp_path / "webhook.log",
    ).start()
    upload = ServerProcess(
        "upload-server",
        {
            **common,
            "SMT_LOCAL_DIR": str(inbox),
            "SMT_UPLOAD_STATE": str(tmp_path / "up" / "ratelimit.sqlite3"),
            "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": "0",
        },
        tmp_path / "upload.log",
    ).start()
    yield {"webhook": webhook, "upload": upload}
    webhook.ensure_stopped()
    upload.ensure_stopped()


def test_malformed_requests_never_put_a_secret_into_the_log(
    servers: dict[str, ServerProcess],
) -> None:
    cases = [
        ("webhook", "/trigger/smt-now", "x-smt-secret", WEBHOOK_SECRET),
        ("webhook", "/trigger/smt-now", "webhook-signature", PREVIOUS),
        ("upload", "/upload", "x-smt-upload-token", UPLOAD_TOKEN),
    ]
    for name, path, header, secret in cases:
        for raw in malformed_requests(path, header, secret):
            answer = send_raw(servers[name].port, raw.encode())
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer[:20], (name, raw, answer)
    time.sleep(0.3)
    for name, server in servers.items():
        log = server.log()
        for secret in (WEBHOOK_SECRET, UPLOAD_TOKEN, PREVIOUS):
            assert secret not in log, (name, log[-2000:])
            assert secret[:16] not in log, name
        # aiohttp 3.9+ names the client; 3.8 (Debian 12) does not
        assert "refused a malformed HTTP request from " in log, log[-2000:]
        assert "Traceback" not in log


def test_a_burst_of_malformed_requests_is_logged_a_bounded_number_of_times(
    servers: dict[str, ServerProcess],
) -> None:
    port = servers["webhook"].port
    raw = b"GET /x HTTP/1.1\x00\r\n\r\n"
    for _ in range(300):
        send_raw(port, raw)
    time.sleep(0.3)
    refused = servers["webhook"].log().count("refused a malformed HTTP request")
    assert 1 <= refused <= 25  # the gate's burst (20) per 10 s, whatever the client sends


def test_redactor_scrubs_message_arguments_and_traceback(caplog) -> None:
    log = logging.getLogger("some.library")
    handler = logging.StreamHandler()
    redactor = SecretRedactor([WEBHOOK_SECRET, "short"])
    try:
        raise ValueError(f"header value {WEBHOOK_SECRET!r} is bad")
    except ValueError:
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 1, "request %s failed", (WEBHOOK_SECRET,), None
        )
        import sys

        record.exc_info = sys.exc_info()
    assert redactor.filter(record)
    text = handler.format(record)
    assert WEBHOOK_SECRET not in text and text.count(REDACTED) == 2
    assert "ValueError" in text and "short" not in redactor.secrets


def test_flood_gate_passes_a_burst_then_counts_what_it_dropped() -> None:
    now = [0.0]
    gate = FloodGate(burst=3, interval=10.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "boom", None, None)

    assert [gate.filter(record()) for _ in range(10)] == [True] * 3 + [False] * 7
    now[0] = 10.5
    first = record()
    assert gate.filter(first) and first.getMessage() == "boom (7 similar messages suppressed)"


# -- connection limits (connguard.py) ------------------------------------------------------


def half_header(port: int, source: str = "127.0.0.3") -> socket.socket:
    """A connection that sends half a request header, from ``source`` (not 127.0.0.1: that is
    the TLS front, whose clients are capped per request)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(b"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\nx-smt-secret: ")
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (header, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def health_from(port: int, source: str) -> int:
    """GET /health from another loopback source address (another client, for the caps)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return int(s.recv(64).split(b" ")[1])


def test_slow_headers_are_cut_off_and_caps_keep_the_server_answering(tmp_path: Path) -> None:
    server = ServerProcess(
        "webhook-server",
        {
            "INTELLIWATT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SMT_SPOOL_DIR": str(tmp_path / "spool"),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": "0",
            "SMT_SHUTDOWN_GRACE": "1",
            "SMT_HTTP_HEADER_TIMEOUT": "1",
            "SMT_HTTP_MAX_PER_CLIENT": "40",
            "SMT_HTTP_MAX_CONNECTIONS": "60",
        },
        tmp_path / "guard.log",
    ).start()
    socks: list[socket.socket] = []
    try:
        socks = [half_header(server.port) for _ in range(100)]
        started = time.monotonic()
        refused = [s for s in socks[40:] if closed_by_server(s, 0.5)]
        assert len(refused) == 60  # over the per-client cap: closed at once
        assert health_from(server.port, "127.0.0.2") == 200  # another client is served
        # The 40 slow ones are closed by the header timeout (1 s), not held forever.
        assert all(closed_by_server(s, 3.0) for s in socks[:40])
        assert time.monotonic() - started < 4.0
        assert health_from(server.port, "127.0.0.3") == 200  # the slot came back
        log = server.log()
        assert 1 <= log.count("no complete request header within 1s") <= 10  # flood-gated
        assert 1 <= log.count("refused a connection from 127.0.0.3") <= 10
        assert "Traceback" not in log
    finally:
        for sock in socks:
            sock.close()
        server.ensure_stopped()


def test_a_complete_request_is_not_cut_by_the_header_timeout(tmp_path: Path) -> None:
    """The timer covers the header only: a slow body and a kept-alive second request are fine."""
    server = ServerProcess(
        "webhook-server",
        {
            "INTELLIWATT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SMT_SPOOL_DIR": str(tmp_path / "spool"),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": "0",
            "SMT_HTTP_HEADER_TIMEOUT": "1",
        },
        tmp_path / "slowbody.log",
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            body = b'{"reason": "slow but steady"}'
            head = (
                "POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\n"
                f"x-smt-secret: {WEBHOOK_SECRET}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode())
            for i in range(0, len(body), 10):
                time.sleep(0.5)  # 1.5 s for the body, longer than the header timeout
                sock.sendall(body[i : i + 10])
            assert b" 202 " in read_response(sock)[:16]
            time.sleep(0.3)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection
            assert b" 200 " in read_response(sock)[:16]
    finally:
        server.ensure_stopped()
