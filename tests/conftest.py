"""Shared pytest fixtures: a real OpenSSH SFTP peer, the strict web-app double, SMT CSV data.

* ``sftp_peer`` / ``sftp_peer_module`` — :class:`testbed.sftp_peer.SftpPeer` (real ``sshd`` on
  127.0.0.1, key auth, pinned host key). A missing ``sshd`` fails the test with the install hint.
* ``webapp`` — :class:`testbed.intelliwatt_double.IntelliWattDouble` on 127.0.0.1 (token
  ``webapp.admin_token``).
* ``inbox`` — an empty directory for ``SMT_LOCAL_DIR``.
* ``ingest_env`` — the droplet's environment names pointing at the three above (a plain dict;
  ``ESIID_DEFAULT`` deliberately absent, ``STATE_FILE`` left to its default).
* ``smt_csv`` — factory for synthetic SMT interval CSVs (bytes, or written into a directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest

from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer, SftpPeerError
from testbed.smt_csv import (
    default_filename,
    generate_interval_csv,
    random_esiid,
    shared_fixture,
)


def _start_peer(workdir: Path) -> SftpPeer:
    try:
        return SftpPeer(workdir).start()
    except SftpPeerError as exc:
        pytest.fail(f"SFTP test peer could not start: {exc}", pytrace=False)


@pytest.fixture
def sftp_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpPeer]:
    """A fresh sshd per test; put files under ``sftp_peer.root``."""
    peer = _start_peer(tmp_path_factory.mktemp("sftp-peer"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def sftp_peer_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpPeer]:
    """One sshd for a whole test module (tests must clean ``root`` themselves)."""
    peer = _start_peer(tmp_path_factory.mktemp("sftp-peer-module"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def webapp() -> Iterator[IntelliWattDouble]:
    """The strict IntelliWatt double; ``webapp.url`` is ``INTELLIWATT_BASE_URL``."""
    with IntelliWattDouble() as double:
        yield double


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def ingest_env(
    sftp_peer: SftpPeer, webapp: IntelliWattDouble, inbox: Path, tmp_path: Path
) -> dict[str, str]:
    """Environment for one ingest pass against the peer and the double (short timeouts)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    assert webapp.admin_token is not None
    env = {
        "ADMIN_TOKEN": webapp.admin_token,
        "INTELLIWATT_BASE_URL": webapp.url,
        **sftp_peer.env(),
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SPOOL_DIR": str(spool),
        "SMT_CONNECT_TIMEOUT": "5",
        "SMT_HTTP_TIMEOUT": "10",
    }
    return env


@dataclass(frozen=True)
class SmtCsvFactory:
    """``smt_csv(esiid=..., days=1)`` → bytes; ``smt_csv.write(dir, ...)`` → Path."""

    default_start: date = date(2025, 3, 8)

    def __call__(
        self, esiid: str | None = None, start: date | None = None, days: int = 1, seed: int = 0
    ) -> bytes:
        return generate_interval_csv(
            esiid or random_esiid(seed), start or self.default_start, days, seed
        )

    def write(
        self,
        directory: Path,
        name: str | None = None,
        esiid: str | None = None,
        start: date | None = None,
        days: int = 1,
        seed: int = 0,
    ) -> Path:
        """Write a CSV into ``directory``; ``name`` defaults to SMT's
        ``IntervalMeterUsage_<esiid>_<YYYYMMDD>.csv``."""
        esiid = esiid or random_esiid(seed)
        start = start or self.default_start
        target = Path(directory) / (name or default_filename(esiid, start, days))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self(esiid, start, days, seed))
        return target

    @staticmethod
    def fixture(name: str) -> Path | None:
        """A file from the shared fixtures if present (tests must also work without it)."""
        for sub in ("smt", "intelliwatt"):
            path = shared_fixture(f"{sub}/{name}")
            if path is not None:
                return path
        return None


@pytest.fixture
def smt_csv() -> SmtCsvFactory:
    return SmtCsvFactory()
