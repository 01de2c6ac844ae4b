"""The TLS front's own limits (the role's Caddyfile, real Caddy): no HTTP/3 advertised while
only TCP 443 is open, an upload without any credential refused before ``100 Continue``,
request bodies capped by Caddy itself, and budgets per real client behind it."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from frontstack import CADDY, TOKEN, FrontStack, start_front
from helpers import ANSIBLE_PLAYBOOK

pytestmark = pytest.mark.skipif(
    CADDY is None or not ANSIBLE_PLAYBOOK.exists(),
    reason="caddy (unpacked by scripts/setup) and the venv's ansible-playbook are needed",
)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontStack]:
    root = tmp_path_factory.mktemp("front-doors")
    for site in ("app", "foreign"):
        (root / site).mkdir()
        (root / site / "index.html").write_text("<!doctype html><title>x</title>")
    stack = start_front(
        root, root / "app", root / "foreign", upload_env={"SMT_UPLOAD_CLIENT_DAILY_LIMIT": "2"}
    )
    try:
        yield stack
    finally:
        stack.stop()


def raw_tls(front: FrontStack, head: bytes, wait: float = 3.0) -> bytes:
    """Send ``head`` over TLS and return what the front answers before ``wait`` seconds."""
    context = ssl.create_default_context(cafile=str(front.ca))
    with socket.create_connection(("127.0.0.1", front.port), timeout=wait) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(head)
            try:
                return sock.recv(65536)
            except TimeoutError:
                return b""


def test_http3_is_not_advertised(front: FrontStack) -> None:
    r = requests.get(front.url("/health"), verify=str(front.ca), timeout=10)
    assert r.status_code in (200, 503)
    assert "Alt-Svc" not in r.headers, r.headers.get("Alt-Svc")


def test_an_upload_without_credentials_gets_401_before_100_continue(front: FrontStack) -> None:
    head = (
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 5000000\r\n\r\n"
    )
    answer = raw_tls(front, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"100 Continue" not in answer
    with_token = raw_tls(
        front,
        head.replace(b"Expect:", f"X-Smt-Upload-Token: {TOKEN}\r\nExpect:".encode()),
    )
    assert with_token.startswith(b"HTTP/1.1 100"), with_token[:200]  # a credential goes on
    # a CORS preflight carries no credential and still reaches the upload server
    options = requests.options(
        front.url("/upload"),
        headers={
            "Origin": front.app_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-smt-upload-ticket",
        },
        verify=str(front.ca),
        timeout=10,
    )
    assert options.headers.get("Access-Control-Allow-Origin") == front.app_origin


def test_caddy_caps_request_bodies_itself(front: FrontStack) -> None:
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"  # over the 1 MiB cap of triggers and the API
    for path in ("/trigger/smt-now", "/api/v1/files/" + "0" * 64 + "/ignore"):
        r = requests.post(
            front.url(path),
            data=big,
            headers={"x-intelliwatt-secret": "s" * 40, "x-smt-upload-token": TOKEN},
            verify=str(front.ca),
            timeout=30,
        )
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
    log = Path(front.root / "upload-server.log").read_text(errors="replace")
    assert "/ignore" not in log  # the upload server never saw the oversized body


def upload_from(front: FrontStack, source: str, name: str) -> int:
    """One upload through the front from the loopback address ``source`` (127.0.0.0/8)."""
    import http.client

    csv = b"ESIID,USAGE_DATE,NOTE\n'10443720000000099,3/8/2025," + name.encode() + b"\n"
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
        + name.encode()
        + b'"\r\nContent-Type: text/csv\r\n\r\n'
        + csv
        + b"\r\n--b--\r\n"
    )
    context = ssl.create_default_context(cafile=str(front.ca))
    conn = http.client.HTTPSConnection(
        "localhost", front.port, source_address=(source, 0), context=context, timeout=10
    )
    try:
        conn.request(
            "POST",
            "/upload",
            body=body,
            headers={
                "x-smt-upload-token": TOKEN,
                "content-type": "multipart/form-data; boundary=b",
            },
        )
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_daily_budget_is_per_real_client_behind_the_front(front: FrontStack) -> None:
    """Every connection to the upload server comes from Caddy on 127.0.0.1; the budget still
    counts each client by the address Caddy saw (X-Forwarded-For, trusted from loopback only)."""
    assert [upload_from(front, "127.0.0.2", f"a{i}.csv") for i in range(3)] == [202, 202, 429]
    assert upload_from(front, "127.0.0.4", "b.csv") == 202  # another client is not locked out
    log = Path(front.root / "upload-server.log").read_text(errors="replace")
    assert "client=127.0.0.2" in log and "client=127.0.0.4" in log
