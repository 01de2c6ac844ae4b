#!/usr/bin/env python3
"""A real OpenSSH ``sshd`` on 127.0.0.1 serving SFTP, the test stand-in for SMT's SFTP server.

Everything lives under ``workdir``: host key, user key, ``authorized_keys``, ``sshd_config``,
pid file, log (``sshd.log``) and the served directory ``root/`` (clients see it at its absolute
path, so ``SMT_REMOTE_DIR = str(peer.root)``). Key-only auth, ``internal-sftp`` forced, no PAM.
The peer pins its own host key into ``known_hosts`` as ``[127.0.0.1]:PORT ssh-ed25519 ...``.

Stdlib only: this file is copied into containers and run with the system python3.
Needs ``sshd`` and ``ssh-keygen`` (Debian: ``openssh-server``).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
OPTIONAL_OPTIONS = ("PerSourcePenalties no",)


class SftpPeerError(RuntimeError):
    """sshd could not be set up or started; the message says why (and quotes its log)."""


def _find_tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if path is None:
        raise SftpPeerError(
            f"{name} not found: install OpenSSH (Debian/Ubuntu: apt-get install openssh-server)"
        )
    return os.path.abspath(path)  # sshd refuses to re-exec from a relative path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _fingerprint(pub_line: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line."""
    blob = base64.b64decode(pub_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _permits(path: Path, uid: int, gids: set[int], mode: int) -> bool:
    """Would ``uid`` (groups ``gids``) get ``mode`` (os.R_OK/os.X_OK bits) on ``path``?"""
    st = path.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    granted = (st.st_mode >> shift) & 0o7
    return granted & mode == mode


def _descendants(pid: int) -> list[int]:
    """PIDs whose parent chain leads to ``pid`` (from /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # field 4 (ppid) follows the ")" that closes the command name
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return list(reversed(found))


class SftpPeer:
    """OpenSSH sshd on 127.0.0.1 with key auth and ``internal-sftp`` only. A context manager."""

    host = "127.0.0.1"

    def __init__(self, workdir: str | Path, port: int = 0, user: str | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.requested_port = port
        self.port = port
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        self.root = self.workdir / "root"
        self.user_key = self.workdir / "id_ed25519"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.known_hosts = self.workdir / "known_hosts"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.log_file = self.workdir / "sshd.log"
        self.host_key_fingerprint = ""
        self.start_seconds = 0.0  # how long the last start() took
        # Options only newer OpenSSH knows; dropped when this sshd rejects them. OpenSSH >= 9.8
        # (Debian 13) penalises a source address after failed auths or dropped sessions, which
        # would lock tests on 127.0.0.1 out after a "wrong key" or kill_connections() test.
        self._optional_options = list(OPTIONAL_OPTIONS)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._keygen = _find_tool("ssh-keygen")
        self._sshd = _find_tool("sshd")

    # -- set-up --------------------------------------------------------------------------------

    def _run_keygen(self, *args: str) -> None:
        result = subprocess.run(
            [self._keygen, "-q", *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise SftpPeerError(f"ssh-keygen {' '.join(args)} failed: {result.stderr.strip()}")

    def _new_key(self, path: Path, comment: str) -> None:
        for stale in (path, path.with_name(path.name + ".pub")):
            stale.unlink(missing_ok=True)
        self._run_keygen("-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # sshd's privilege separation needs this directory (normally made by systemd).
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.user_key.exists():
            self._new_key(self.user_key, "smt-testbed-user")
        pub = self.user_key.with_name(self.user_key.name + ".pub").read_text()
        self.authorized_keys.write_text(pub)
        if not self.host_key.exists():
            self._new_key(self.host_key, "smt-testbed-host")
        self._check_user_access()

    def _check_user_access(self) -> None:
        """sshd reads authorized_keys as the login user: fail early, not with a vague auth error."""
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise SftpPeerError(f"user {self.user!r} does not exist") from None
        if account.pw_uid == os.geteuid():
            return
        gids = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if self.user in g.gr_mem)}
        needs = [(p, os.X_OK) for p in reversed(self.authorized_keys.parents)]
        needs += [(self.authorized_keys, os.R_OK), (self.root, os.R_OK | os.X_OK)]
        for path, mode in needs:
            if not _permits(path, account.pw_uid, gids, mode):
                raise SftpPeerError(
                    f"{path} is not accessible to user {self.user}: sshd reads "
                    f"{self.authorized_keys} as that user (use a workdir whose parents are "
                    "world-traversable, e.g. mode 0755)"
                )

    def _write_config(self) -> None:
        lines = [
            # Port and ListenAddress come from the command line (-p, -o ListenAddress=)
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTTY no",
            "PrintMotd no",
            "UseDNS no",
            "LogLevel VERBOSE",
            # benchmarks and concurrency tests open many sessions at once
            "MaxStartups 200",
            "MaxSessions 64",
            "Subsystem sftp internal-sftp",
            "ForceCommand internal-sftp",
            *self._optional_options,
            "",
        ]
        self.config.write_text("\n".join(lines))

    def _pin_host_key(self) -> None:
        pub = self.host_key.with_name(self.host_key.name + ".pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {pub[0]} {pub[1]}\n")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> SftpPeer:
        if self._proc is not None:
            return self
        began = time.monotonic()
        self._prepare()
        attempts = 1 if self.requested_port else 3  # a picked free port can be taken meanwhile
        for attempt in range(1, attempts + 1):
            if not self.requested_port:
                self.port = _free_port(self.host)
            try:
                self._spawn()
                break
            except SftpPeerError:
                if attempt == attempts:
                    raise
        self._pin_host_key()
        self._read_fingerprint()
        self.start_seconds = time.monotonic() - began
        atexit.register(self.stop)
        return self

    def _read_fingerprint(self) -> None:
        pub = self.host_key.with_name(self.host_key.name + ".pub").read_text()
        self.host_key_fingerprint = _fingerprint(pub)

    def _check_config(self) -> None:
        """``sshd -t``; options this sshd does not know are dropped from the optional ones."""
        while True:
            self._write_config()
            check = subprocess.run(
                [self._sshd, "-t", "-f", str(self.config)],
                capture_output=True,
                text=True,
                check=False,
            )
            if check.returncode == 0:
                return
            unknown = [o for o in self._optional_options if o.split()[0] in check.stderr]
            if not unknown:
                raise SftpPeerError(f"sshd -t rejected {self.config}: {check.stderr.strip()}")
            self._optional_options = [o for o in self._optional_options if o not in unknown]

    def _spawn(self) -> None:
        self._check_config()
        log_fh = open(self.log_file, "ab")  # closed in _terminate()
        cmd = [self._sshd, "-D", "-e", "-f", str(self.config), "-p", str(self.port)]
        cmd += ["-o", f"ListenAddress={self.host}"]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=log_fh,
            start_new_session=True,
        )
        self._proc, self._log_fh = proc, log_fh
        try:
            self._wait_for_banner()
        except SftpPeerError:
            self._terminate()
            raise

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_for_banner(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SftpPeerError(
                    f"sshd exited with {self._proc.returncode} on port {self.port}; "
                    f"log {self.log_file}:\n{self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    banner = sock.recv(256)
                if banner.startswith(b"SSH-2.0-"):
                    return
                last_error = f"unexpected banner {banner[:40]!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.02)
        raise SftpPeerError(
            f"sshd on {self.host}:{self.port} not ready after {START_TIMEOUT:.0f}s ({last_error}); "
            f"log {self.log_file}:\n{self._log_tail()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        sessions = _descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self._kill_pids(sessions)  # per-connection sshd children outlive the listener
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self.pid_file.unlink(missing_ok=True)

    @staticmethod
    def _kill_pids(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop sshd (its own PID) and any live SFTP sessions it spawned."""
        self._terminate()
        atexit.unregister(self.stop)

    def rotate_host_key(self) -> None:
        """Restart sshd on the same port with a NEW host key; ``known_hosts`` keeps the old pin."""
        pinned = self.known_hosts.read_text() if self.known_hosts.exists() else None
        self._terminate()
        self._new_key(self.host_key, "smt-testbed-host-rotated")
        requested, self.requested_port = self.requested_port, self.port
        try:
            began = time.monotonic()
            self._spawn()
            self.start_seconds = time.monotonic() - began
        finally:
            self.requested_port = requested
        self._read_fingerprint()
        if pinned is not None:
            self.known_hosts.write_text(pinned)

    def kill_connections(self) -> int:
        """SIGKILL the per-connection sshd processes (drops live sessions); returns how many."""
        if self._proc is None:
            return 0
        pids = _descendants(self._proc.pid)
        self._kill_pids(pids)
        return len(pids)

    def connection_count(self) -> int:
        """Live per-connection sshd processes (direct children of the listener)."""
        if self._proc is None:
            return 0
        pid = self._proc.pid
        return sum(1 for p in _descendants(pid) if _parent(p) == pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def env(self) -> dict[str, str]:
        """The droplet's ``SMT_*`` names pointing at this peer."""
        return {
            "SMT_HOST": self.host,
            "SMT_PORT": str(self.port),
            "SMT_USER": self.user,
            "SMT_KEY": str(self.user_key),
            "SMT_KNOWN_HOSTS": str(self.known_hosts),
            "SMT_REMOTE_DIR": str(self.root),
        }

    def __enter__(self) -> SftpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return int(fh.read().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run OpenSSH sshd on 127.0.0.1 as an SFTP test peer; prints the SMT_* env "
        "lines and runs until SIGTERM/SIGINT. SIGUSR1 restarts sshd with a new host key "
        "(known_hosts keeps the old pin), SIGUSR2 drops live sessions."
    )
    parser.add_argument("--workdir", required=True, help="directory for keys, config and root/")
    parser.add_argument("--port", type=int, default=2222, help="port (0 = pick a free one)")
    parser.add_argument("--user", help="login user (default: the current user)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        peer = SftpPeer(args.workdir, port=args.port, user=args.user).start()
    except SftpPeerError as exc:
        print(f"sftp_peer: {exc}", file=sys.stderr)
        return 1

    def rotate(*_: object) -> None:
        peer.rotate_host_key()
        print(f"# host key rotated: {peer.host_key_fingerprint}", file=sys.stderr, flush=True)

    def drop(*_: object) -> None:
        count = peer.kill_connections()
        print(f"# dropped {count} session processes", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, rotate)
    signal.signal(signal.SIGUSR2, drop)
    for name, value in peer.env().items():
        print(f"{name}={value}")
    print(
        f"# sshd pid {peer.pid}, host key {peer.host_key_fingerprint}, "
        f"started in {peer.start_seconds:.3f}s",
        file=sys.stderr,
    )
    sys.stdout.flush()
    try:
        stop.wait()
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
