"""The droplet's front on loopback, for the operator-page tests: the real TLS front (Caddy, with
the role's own Caddyfile rendered by Ansible), the upload server behind it, the IntelliWatt
double, and a stand-in for ``smt-ingest.path`` that runs ``smt-droplet ingest --no-sync`` when
a request lands in the spool queue (what systemd does on the droplet).

Two more HTTPS origins serve a stand-in for the IntelliWatt admin UI: ``app`` is the one the
upload server allows (``SMT_UPLOAD_CORS_ORIGIN``), ``foreign`` is any other site.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ANSIBLE_PLAYBOOK, REPO, cli_env, run_playbook
from serverproc import ServerProcess

from testbed.intelliwatt_double import IntelliWattDouble

# scripts/setup unpacks Debian's caddy here (installing the package would start a server).
_UNPACKED = REPO / ".cache/tools/usr/bin/caddy"
CADDY = str(_UNPACKED) if _UNPACKED.is_file() else shutil.which("caddy")
TEMPLATE = REPO / "roles/smt_tls/templates/etc/caddy/Caddyfile.j2"
TOKEN = "operator-page-token-for-tests-0123456789"
TICKET_SECRET = "operator-page-ticket-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PathUnit:
    """Runs one ingest pass whenever ``queue/`` holds a request (``DirectoryNotEmpty=``)."""

    def __init__(self, env: dict[str, str], queue: Path, log_path: Path) -> None:
        self.env, self.queue, self.log_path = env, queue, log_path
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PathUnit:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.queue.is_dir() and any(self.queue.glob("*.json")):
                with self.log_path.open("ab") as log:
                    subprocess.run(
                        [sys.executable, "-m", "smt_droplet", "ingest", "--no-sync"],
                        env=cli_env(self.env),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        timeout=120,
                        check=False,
                    )
                self.passes += 1
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=130)


@dataclass
class FrontStack:
    root: Path
    double: IntelliWattDouble
    upload: ServerProcess
    path_unit: PathUnit
    caddy: subprocess.Popen[bytes]
    port: int
    app_port: int
    foreign_port: int
    ca: Path
    inbox: Path
    spool: Path
    env: dict[str, str] = field(default_factory=dict)

    def url(self, path: str = "/") -> str:
        return f"https://localhost:{self.port}{path}"

    @property
    def app_origin(self) -> str:
        return f"https://localhost:{self.app_port}"

    @property
    def foreign_origin(self) -> str:
        return f"https://localhost:{self.foreign_port}"

    def stop(self) -> None:
        self.path_unit.stop()
        self.upload.ensure_stopped()
        if self.caddy.poll() is None:
            self.caddy.terminate()
            try:
                self.caddy.wait(10)
            except subprocess.TimeoutExpired:
                self.caddy.kill()
                self.caddy.wait()
        self.double.stop()


def _render_caddyfile(root: Path, port: int, upload_port: int) -> str:
    """The role's template, rendered by Ansible's own ``template`` module."""
    out = root / "Caddyfile.role"
    plays = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {
                "smt_tls_mode": "internal",
                "smt_tls_domain": "localhost",
                "smt_tls_port": port,
                "smt_tls_upload_port": upload_port,
                "smt_tls_webhook_port": free_port(),  # no webhook in these tests
                "smt_tls_hsts_max_age": 300,
                "smt_tls_read_header_timeout": "10s",
                "smt_tls_read_body_timeout": "10m",
                "smt_tls_idle_timeout": "2m",
            },
            "tasks": [
                {
                    "name": "Render the TLS front's configuration",
                    "ansible.builtin.template": {
                        "src": str(TEMPLATE),
                        "dest": str(out),
                        "mode": "0600",
                    },
                }
            ],
        }
    ]
    result, _ = run_playbook(root, plays, json_output=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


def _site(port: int, directory: Path) -> str:
    return f"https://localhost:{port} {{\n\ttls internal\n\troot * {directory}\n\tfile_server\n}}\n"


def _wait_for_tls(port: int, ca: Path, caddy: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if caddy.poll() is not None:
            raise RuntimeError(f"caddy exited {caddy.returncode}:\n{log.read_text()}")
        if ca.is_file():
            probe = subprocess.run(
                [
                    *("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"),
                    *("--cacert", str(ca), f"https://localhost:{port}/health"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.stdout in ("200", "503"):
                return
        time.sleep(0.2)
    raise RuntimeError(f"caddy did not serve TLS on {port}:\n{log.read_text()}")


def start_front(
    root: Path, app_page: Path, foreign_page: Path, upload_env: dict[str, str] | None = None
) -> FrontStack:
    """Everything in the module docstring, under ``root``; the caller stops it.
    ``upload_env``: more settings for the upload server."""
    assert CADDY is not None and ANSIBLE_PLAYBOOK.exists()
    inbox, spool, state = root / "inbox", root / "spool", root / "state"
    for d in (inbox, spool, state):
        d.mkdir()
    port, app_port, foreign_port = free_port(), free_port(), free_port()
    double = IntelliWattDouble().start()
    assert double.admin_token is not None
    common = {
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SPOOL_DIR": str(spool),
        "STATE_FILE": str(state / "posted_sha256"),
    }
    upload = ServerProcess(
        "upload-server",
        {
            **common,
            "SMT_UPLOAD_STATE": str(state / "ratelimit.sqlite3"),
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": "0",
            "SMT_UPLOAD_TOKEN": TOKEN,
            "SMT_UPLOAD_TICKET_SECRET": TICKET_SECRET,
            "SMT_UPLOAD_CORS_ORIGIN": f"https://localhost:{app_port}",
            "SMT_UPLOAD_MAX_BYTES": str(20 * 1024 * 1024),
            "SMT_SHUTDOWN_GRACE": "1",
            **(upload_env or {}),
        },
        root / "upload-server.log",
    ).start()
    ingest_env = {
        **common,
        "ADMIN_TOKEN": double.admin_token,
        "INTELLIWATT_BASE_URL": double.url,
        "SMT_HTTP_TIMEOUT": "10",
        "SMT_DELIVERY": "raw-upload",  # the app as hosted: its answers say what it stored
    }
    path_unit = PathUnit(ingest_env, spool / "queue", root / "ingest.log").start()
    caddyfile = root / "Caddyfile"
    caddyfile.write_text(
        _render_caddyfile(root, port, upload.port)
        + _site(app_port, app_page)
        + _site(foreign_port, foreign_page)
    )
    caddy_home = root / "caddy-home"
    caddy_log = root / "caddy.log"
    with caddy_log.open("ab") as log:
        caddy = subprocess.Popen(
            [CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            env={
                "HOME": str(caddy_home),
                "XDG_DATA_HOME": str(caddy_home / "data"),
                "XDG_CONFIG_HOME": str(caddy_home / "config"),
                "PATH": "/usr/bin:/bin",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ca = caddy_home / "data/caddy/pki/authorities/local/root.crt"
    stack = FrontStack(
        root, double, upload, path_unit, caddy, port, app_port, foreign_port, ca, inbox, spool
    )
    stack.env = ingest_env
    try:
        _wait_for_tls(port, ca, caddy, caddy_log)
    except BaseException:
        with contextlib.suppress(Exception):
            stack.stop()
        raise
    return stack
