"""Run ``python -m smt_droplet <server>`` as a real subprocess on 127.0.0.1 for the tests.

The server binds port 0 (any free port) and the helper reads the port from its startup line, so
parallel runs never collide. Logs go to a file (no pipe to fill up).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    def __init__(
        self,
        command: str,
        env: dict[str, str],
        log_path: Path,
        args: tuple[str, ...] = (),
        pythonpath: Path = ROOT / "src",
    ) -> None:
        self.pythonpath = pythonpath  # where the package is imported from (the checkout's)
        self.command = command
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 15.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "INTELLIWATT_"))}
        env.pop("DROPLET_WEBHOOK_SECRET", None)
        env.pop("STATE_FILE", None)
        env["PYTHONPATH"] = str(self.pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smt_droplet", self.command, *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=0o007,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            match = _LISTENING.search(text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"{self.command} did not start:\n{self.log()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in log:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_once(
    command: str,
    env: dict[str, str],
    timeout: float = 15.0,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run a server command that is expected to exit by itself (refusing to start)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "INTELLIWATT_"))}
    full.pop("DROPLET_WEBHOOK_SECRET", None)
    full["PYTHONPATH"] = str(ROOT / "src")
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "smt_droplet", command, *extra_args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def raw_request(port: int, head: bytes, body: bytes = b"", read: bool = True) -> bytes:
    """Send bytes over a plain socket; return what the server answered before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))
