"""The pipelined large-file read of the SFTP mirror, against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import os
import time
from pathlib import Path

import paramiko
import pytest

from smt_droplet import sftp_mirror
from smt_droplet.config import SftpSettings
from smt_droplet.sftp_mirror import connect, load_private_key, mirror
from testbed.sftp_peer import SftpPeer


def settings_for(peer: SftpPeer, inbox: Path) -> SftpSettings:
    return SftpSettings.from_env(
        {**peer.env(), "SMT_LOCAL_DIR": str(inbox), "SMT_CONNECT_TIMEOUT": "5"}
    )


def put(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    old = time.time() - 600
    os.utime(path, (old, old))
    return path


def test_large_file_arrives_byte_identical(sftp_peer: SftpPeer, inbox: Path) -> None:
    # Not a multiple of the request size, more than PIPE_DEPTH requests.
    data = os.urandom(sftp_mirror.PIPE_REQUEST * sftp_mirror.PIPE_DEPTH * 2 + 12345)
    put(sftp_peer.root, "big.csv", data)
    result = mirror(settings_for(sftp_peer, inbox))
    assert result.error is None and [f.status for f in result.files] == ["downloaded"]
    assert (inbox / "big.csv").read_bytes() == data
    assert [p.name for p in inbox.iterdir()] == ["big.csv"]  # no partial file left


def test_short_answers_are_asked_again(
    sftp_peer: SftpPeer, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSH answers at most ~255 KiB per READ: asking for 400 KiB gets short answers,
    whose remainder must be requested again (and the file still be complete)."""
    monkeypatch.setattr(sftp_mirror, "PIPE_REQUEST", 400 * 1024)
    data = os.urandom(3 * 1024 * 1024 + 777)
    put(sftp_peer.root, "short.csv", data)
    result = mirror(settings_for(sftp_peer, inbox))
    assert result.error is None and [f.status for f in result.files] == ["downloaded"]
    assert (inbox / "short.csv").read_bytes() == data


def test_file_that_shrank_reads_short(sftp_peer: SftpPeer, tmp_path: Path) -> None:
    """A file truncated after it was listed: the read stops at EOF and reports fewer bytes
    (the mirror then discards it as changed, see test_sync)."""
    listed = 2 * 1024 * 1024
    path = put(sftp_peer.root, "shrinks.csv", os.urandom(listed))
    settings = settings_for(sftp_peer, tmp_path)
    transport = connect(settings, load_private_key(settings.key))
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        remote = sftp.open(str(path), "rb")
        os.truncate(path, 1_000_000)
        fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            received = sftp_mirror._read_pipelined(sftp, remote, listed, fd)
        finally:
            os.close(fd)
        assert received == 1_000_000
        # The channel is still usable after the early stop (late answers are absorbed).
        assert remote.stat().st_size == 1_000_000
        remote.close()
        assert sftp.listdir(str(sftp_peer.root)) == ["shrinks.csv"]
    finally:
        transport.close()
    assert (tmp_path / "out").read_bytes() == path.read_bytes()
