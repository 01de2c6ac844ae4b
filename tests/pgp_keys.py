"""Throwaway GnuPG keyrings for the PGP tests (made at test time; no key material committed).

Shared by ``test_pgp_delivery.py`` (the unpacking) and ``test_pgp_ingest.py`` (the ingest pass).
Keep home directories under a short path (``tempfile.mkdtemp(dir="/tmp")``): gpg-agent's socket
lives in the home and ``sun_path`` is 108 bytes. Call :func:`stop_agents` when done.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Keyring:
    home: Path
    uid: str
    fingerprint: str


def run_gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    """Run ``gpg --batch`` in ``home``; assert success; return stdout."""
    cmd = ["gpg", "--homedir", str(home), "--batch", "--yes", "--no-tty", *args]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def new_keyring(root: Path, name: str, passphrase: str = "") -> Keyring:
    """A fresh GnuPG home ``root/name`` with one key pair (unprotected unless ``passphrase``)."""
    home = root / name
    home.mkdir(mode=0o700)
    # Skip gpg-agent's ~100 ms-to-seconds S2K calibration: test keys need no real protection.
    (home / "gpg-agent.conf").write_text("s2k-count 65536\n")
    uid = f"{name} <{name}@droplet.test>"
    run_gpg(
        home,
        "--passphrase",
        passphrase,
        "--pinentry-mode",
        "loopback",
        "--quick-gen-key",
        uid,
        "future-default",
        "default",
        "never",
    )
    colons = run_gpg(home, "--with-colons", "--list-keys").decode()
    fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
    return Keyring(home, uid, fpr)


def encrypt_to(keyring: Keyring, payload: bytes) -> bytes:
    """ASCII-armored message for ``keyring``'s key, as SMT sends it."""
    return run_gpg(
        keyring.home,
        "--trust-model",
        "always",
        "--armor",
        "--recipient",
        keyring.fingerprint,
        "--encrypt",
        data=payload,
    )


def make_zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def stop_agents(homes: Iterable[Path]) -> None:
    """End the gpg-agents the tests started in these homes."""
    for home in homes:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            check=False,
            timeout=30,
        )
