"""The benchmark's long-link relay (testbed/delay_link.py): delays, keeps order, loses nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parents[1] / "testbed" / "delay_link.py"


@pytest.fixture
def echo() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    thread.join(timeout=5)


def start_relay(port: int, delay_ms: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), "--to", f"127.0.0.1:{port}", "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening 127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


def test_a_round_trip_takes_twice_the_delay_and_bytes_come_back_in_order(echo: int) -> None:
    proc, port = start_relay(echo, 100)
    try:
        payload = os.urandom(3 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            began = time.monotonic()
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
            round_trip = time.monotonic() - began
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = conn.recv(1 << 20)
                assert chunk, "the relay closed early"
                got += chunk
            sender.join()
        assert bytes(got) == payload
        assert 0.2 <= round_trip < 1.0, round_trip
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_without_a_delay_it_relays_at_once(echo: int) -> None:
    proc, port = start_relay(echo, 0)
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            began = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            assert time.monotonic() - began < 0.2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
