"""Helpers the test modules share (fixtures live in ``conftest.py``).

``REPO`` is the checkout; ``sha256`` digests bytes or a file; ``cli`` runs ``smt-droplet`` in a
subprocess with the given settings only (none inherited from the caller).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
VENV_BIN = REPO / ".venv" / "bin"
ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"


def sha256(data: bytes | Path) -> str:
    """The hex SHA-256 of ``data`` (bytes, or the content of a file)."""
    if isinstance(data, Path):
        data = data.read_bytes()
    return hashlib.sha256(data).hexdigest()


def cli_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any droplet setting, then ``env``, then the checkout's
    package on ``PYTHONPATH`` (no bytecode written into the tree)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SMT_", "ADMIN", "INTELLI")) and k != "STATE_FILE"
    }
    return {**clean, **env, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"}


def cli(args: list[str], env: Mapping[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m smt_droplet ARGS`` with :func:`cli_env` of ``env``."""
    kw.setdefault("timeout", 60)
    return subprocess.run(
        [sys.executable, "-m", "smt_droplet", *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        check=False,
        **kw,
    )


def start_cli(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``python -m smt_droplet ARGS`` in the background (a pass to kill, stall, race)."""
    return subprocess.Popen(
        [sys.executable, "-m", "smt_droplet", *args],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_playbook(
    tmp_path: Path,
    plays: list[dict[str, Any]] | Path,
    *args: str,
    inventory: str = "localhost,",
    json_output: bool = True,
    python: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    if isinstance(plays, Path):
        playbook = plays
    else:
        playbook = tmp_path / f"play-{time.monotonic_ns()}.yml"
        playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SMT_"))},
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_REMOTE_TMP": str(tmp_path / "ansible-remote"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    if json_output:
        env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.posix.json"
    cmd = [
        str(VENV_BIN / "ansible-playbook"),
        "-i",
        inventory,
        "-e",
        f"ansible_python_interpreter={python or VENV_BIN / 'python'}",
        str(playbook),
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    parsed = json.loads(proc.stdout) if json_output and proc.stdout.strip() else None
    return proc, parsed


def task_results(parsed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task name → the single host's result."""
    out = {}
    for play in parsed["plays"]:
        for task in play["tasks"]:
            out[task["task"]["name"]] = next(iter(task["hosts"].values()))
    return out


def fast_env(
    base: Mapping[str, str],
    *,
    post_retries: int | None = None,
    sftp_retries: int = 1,
    lock_wait: float = 30,
    **extra: str,
) -> dict[str, str]:
    """``base`` (the ``ingest_env`` fixture) with retries and back-off short enough for tests."""
    env = {
        **base,
        "SMT_RETRY_BASE_DELAY": "0.01",
        "SMT_RETRY_MAX_DELAY": "0.05",
        "SMT_SFTP_RETRIES": str(sftp_retries),
        "SMT_LOCK_WAIT": f"{lock_wait:g}",
        **extra,
    }
    if post_retries is not None:
        env["SMT_POST_RETRIES"] = str(post_retries)
    return env


class AlertReceiver:
    """A chat webhook on loopback (Slack, Discord, ntfy stand-in): records every POST body,
    answers ``status``. ``url`` carries a path segment that is a secret in a real one."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T0/SECRETPART"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
