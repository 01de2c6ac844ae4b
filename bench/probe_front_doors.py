#!/usr/bin/env python3
"""Hostile probes of the webhook server on 127.0.0.1, for before/after comparisons.

    bench/probe_front_doors.py [--src DIR] slow-headers   # 1,100 half-sent headers, fd limit 1024
    bench/probe_front_doors.py [--src DIR] replay         # a signed request x7, nan, +299 s
    bench/probe_front_doors.py [--src DIR] queue-cap      # 2,000 concurrent triggers, cap 20
    bench/probe_front_doors.py [--src DIR] leak           # malformed requests quoting the secret

``--src`` is the ``src/`` of the checkout to probe (default: this one; a ``git worktree`` of an
older commit gives the "before"). Each probe starts its own server on a free loopback port,
prints one line, and stops the server it started.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

SECRET = "probe-secret-0123456789abcdefghijklmnop"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(src: Path, root: Path, nofile: int | None = None, **extra: str):
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(src),
        "PYTHONDONTWRITEBYTECODE": "1",
        "INTELLIWATT_WEBHOOK_SECRET": SECRET,
        "SMT_SPOOL_DIR": str(root / "spool"),
        "SMT_WEBHOOK_BIND": "127.0.0.1",
        "SMT_WEBHOOK_PORT": str(port),
        "SMT_WEBHOOK_STATE": str(root / "state" / "replay.sqlite3"),
        **extra,
    }
    cmd = [sys.executable, "-m", "smt_droplet", "webhook-server"]
    if nofile:
        cmd = ["prlimit", f"--nofile={nofile}:{nofile}", *cmd]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/health", timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    return proc, url, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def sig(stamp: str, body: bytes) -> str:
    mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def slow_headers(src: Path, root: Path) -> str:
    proc, _, port = start(src, root, nofile=1024)
    socks = []
    for _ in range(1100):
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\n")
            socks.append(c)
        except OSError:
            pass
    time.sleep(12)
    still = 0
    for c in socks:
        c.settimeout(0.01)
        try:
            if c.recv(1) != b"":
                still += 1
        except TimeoutError:
            still += 1
        except OSError:
            pass
    began = time.monotonic()
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
        ) as h:
            h.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            h.settimeout(5)
            health = f"{h.recv(15)!r} in {time.monotonic() - began:.2f}s"
    except OSError as exc:
        health = f"failed: {type(exc).__name__} after {time.monotonic() - began:.2f}s"
    for c in socks:
        c.close()
    time.sleep(0.5)
    stop(proc)
    text = (root / "server.log").read_text(errors="replace")
    return (
        f"opened {len(socks)} half-header connections; still open after 12 s: {still}; "
        f"/health from another client: {health}; log lines: {len(text.splitlines())}, "
        f"tracebacks: {text.count('Traceback')}"
    )


def replay(src: Path, root: Path) -> str:
    proc, url, _ = start(src, root, SMT_WEBHOOK_SIGNATURE="require")
    body = b'{"reason":"probe"}'
    stamp = str(int(time.time()))
    headers = {"x-smt-timestamp": stamp, "x-smt-signature": sig(stamp, body)}
    target = url + "/trigger/smt-now"
    codes = [
        requests.post(target, data=body, headers=headers, timeout=5).status_code for _ in range(7)
    ]
    ahead = str(int(time.time()) + 299)
    future = requests.post(
        target, data=body, headers={"x-smt-timestamp": ahead, "x-smt-signature": sig(ahead, body)},
        timeout=5,
    ).status_code  # fmt: skip
    nan = requests.post(
        target, data=body, headers={"x-smt-timestamp": "nan", "x-smt-signature": sig("nan", body)},
        timeout=5,
    ).status_code  # fmt: skip
    stop(proc)
    return f"one signed request x7: {codes}; +299 s: {future}; nan: {nan}"


def queue_cap(src: Path, root: Path) -> str:
    proc, url, _ = start(src, root, SMT_WEBHOOK_MAX_QUEUED="20", SMT_HTTP_MAX_PER_CLIENT="4096",
                         SMT_HTTP_MAX_CONNECTIONS="4096")  # fmt: skip

    def one(_: int) -> int:
        return requests.post(
            url + "/trigger/smt-now", headers={"x-smt-secret": SECRET}, timeout=30
        ).status_code

    with ThreadPoolExecutor(max_workers=200) as pool:
        codes = list(pool.map(one, range(2000)))
    stop(proc)
    queued = len(list((root / "spool" / "queue").glob("*.json")))
    return (
        f"2000 concurrent triggers, cap 20: 202 x{codes.count(202)}, 429 x{codes.count(429)}, "
        f"queued files: {queued}"
    )


def leak(src: Path, root: Path) -> str:
    proc, _, port = start(src, root)
    for raw in (
        f"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\nx-smt-secret: {SECRET}\r\r\n\r\n",
        f"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\nx-smt-secret {SECRET}\r\n\r\n",
        f"GET /{SECRET} HTTP/1.1\x00\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(raw.encode())
            s.settimeout(2)
            try:
                s.recv(100)
            except OSError:
                pass
    time.sleep(0.5)
    stop(proc)
    text = (root / "server.log").read_text(errors="replace")
    return (
        f"3 malformed requests quoting the secret: secret in the log: {SECRET in text}; "
        f"log lines: {len(text.splitlines())}"
    )


PROBES = {"slow-headers": slow_headers, "replay": replay, "queue-cap": queue_cap, "leak": leak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "src")
    parser.add_argument("probe", choices=sorted(PROBES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{args.probe}: {PROBES[args.probe](args.src.resolve(), Path(tmp))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
