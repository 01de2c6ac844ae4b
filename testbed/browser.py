"""Headless Chromium for the operator-page tests: Debian's ``chromium`` (apt), driven by
Playwright from PyPI through ``executable_path`` (``playwright install`` is never run).

Shared by ``tests/test_browser.py`` (loopback) and the full-stack scenario (the droplet
container): a ``$HOME`` whose NSS database trusts a test CA, the launch, a file dropped the way a
person drops one, a poll that works under the page's strict CSP, and a TCP forwarder that puts
the container's HTTPS port on this machine's loopback (so the browser reaches it by the name in
its certificate, ``localhost``).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the binary behind Debian's /usr/bin/chromium


def trusting_home(root: Path, ca_pem: Path) -> Path:
    """A ``$HOME`` whose NSS database trusts ``ca_pem`` for TLS servers: Chromium on Linux reads
    ``~/.pki/nssdb``, so the browser trusts the test CA as a real one, not by skipping checks."""
    home = root / "browser-home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    if not (nssdb / "cert9.db").exists():
        subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "smt-test-ca", "-t", "C,,", "-i", ca_pem],
        check=True,
    )
    return home


def launch(playwright: Any, home: Path) -> Any:
    """Debian's Chromium, headless, with ``home`` (and so its trusted CA)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


def wait_js(page: Any, expression: str, arg: Any = None, timeout: float = 30) -> None:
    """Poll ``expression`` in the page until it is truthy (``page.wait_for_function`` evaluates a
    string, which the page's Content-Security-Policy rightly refuses)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


def drop_file(page: Any, selector: str, name: str, data: bytes) -> None:
    """Drag a file onto ``selector`` the way a person does: dragover, then drop."""
    transfer = page.evaluate_handle(
        """([name, text]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([text], name, { type: "text/csv" }));
            return dt;
        }""",
        [name, data.decode("latin-1")],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


class Forward:
    """``127.0.0.1:<port>`` → ``target``, byte for byte (TLS stays end to end)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._server.close()
