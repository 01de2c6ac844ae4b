"""The pipelined large-file read of the SFTP mirror, against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import paramiko
import pytest

from smt_droplet import durable, sftp_mirror
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
    # Not a multiple of the request size, more than the requests in flight on loopback.
    data = os.urandom(sftp_mirror.PIPE_REQUEST * sftp_mirror.PIPE_DEPTH_FLOOR * 2 + 12345)
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


def test_aes_gcm_is_negotiated_where_paramiko_has_it(sftp_peer: SftpPeer, tmp_path: Path) -> None:
    """paramiko lists AES-GCM after the CTR ciphers (which need an HMAC per packet); the mirror
    asks for it first, and OpenSSH agrees. A paramiko without it (Debian 12's 2.12) gets CTR."""
    settings = settings_for(sftp_peer, tmp_path)
    transport = connect(settings, load_private_key(settings.key))
    try:
        has_gcm = "aes128-gcm@openssh.com" in paramiko.Transport._preferred_ciphers
        expected = "aes128-gcm@openssh.com" if has_gcm else "aes128-ctr"
        assert (transport.remote_cipher, transport.local_cipher) == (expected, expected)
        with paramiko.SFTPClient.from_transport(transport) as sftp:  # and it carries data
            assert sftp is not None and sftp.listdir(str(sftp_peer.root)) == []
    finally:
        transport.close()
    # The client's own default order is left as it was for every other transport.
    assert paramiko.Transport._preferred_ciphers[0] == "aes128-ctr"


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
            piped = sftp_mirror._read_pipelined(sftp, remote, listed, fd)
        finally:
            os.close(fd)
        assert piped == (1_000_000, None)  # short: no FSTAT answer is trusted, the caller asks
        # The channel is still usable after the early stop (late answers are absorbed).
        assert remote.stat().st_size == 1_000_000
        remote.close()
        assert sftp.listdir(str(sftp_peer.root)) == ["shrinks.csv"]
    finally:
        transport.close()
    assert (tmp_path / "out").read_bytes() == path.read_bytes()


def small_items(peer: SftpPeer, inbox: Path, names: list[str]) -> list[sftp_mirror.MirroredFile]:
    items = []
    for name in names:
        path = peer.root / name
        st = path.stat() if path.exists() else None
        items.append(
            sftp_mirror.MirroredFile(
                rel=name,
                remote_dir=str(peer.root),
                local_dir=inbox,
                size=st.st_size if st else 100,
                mtime=int(st.st_mtime) if st else 0,
                status=sftp_mirror.WOULD_DOWNLOAD,
            )
        )
    return items


def test_small_files_pipelined_on_one_channel(sftp_peer: SftpPeer, inbox: Path) -> None:
    """More files than SMALL_DEPTH in flight; an empty file; a file gone since the listing
    fails alone; a file grown since the listing is not kept."""
    data = {f"f{i:03}.csv": os.urandom(1000 + i * 97) for i in range(3 * sftp_mirror.SMALL_DEPTH)}
    for name, body in data.items():
        put(sftp_peer.root, name, body)
    put(sftp_peer.root, "empty.csv", b"")
    put(sftp_peer.root, "grown.csv", b"a,b\n")
    names = ["empty.csv", *data, "gone.csv", "grown.csv"]
    items = small_items(sftp_peer, inbox, names)
    with open(sftp_peer.root / "grown.csv", "ab") as fh:
        fh.write(b"1,2\n")
    settings = settings_for(sftp_peer, inbox)
    transport = connect(settings, load_private_key(settings.key))
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        assert sftp_mirror._download_small_batch(sftp, items)
        assert sftp.listdir(str(sftp_peer.root))  # the channel is still in order
    finally:
        transport.close()
    status = {i.rel: i.status for i in items}
    assert status.pop("gone.csv") == "failed"
    assert status.pop("grown.csv") == "skipped-growing"
    assert set(status.values()) == {"downloaded"}
    assert not any(i.connection_lost for i in items)
    for name, body in data.items():
        assert (inbox / name).read_bytes() == body
        assert int((inbox / name).stat().st_mtime) == int((sftp_peer.root / name).stat().st_mtime)
    assert (inbox / "empty.csv").read_bytes() == b""
    assert sorted(p.name for p in inbox.iterdir()) == sorted(["empty.csv", *data])


def test_connection_killed_during_small_files_reconnects_and_completes(
    sftp_peer: SftpPeer, inbox: Path
) -> None:
    data = {f"s{i:04}.csv": os.urandom(2000) + str(i).encode() for i in range(1500)}
    for name, body in data.items():
        put(sftp_peer.root, name, body)
    env = {
        **sftp_peer.env(),
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SFTP_RETRIES": "2",
        "SMT_RETRY_BASE_DELAY": "0.05",
        "SMT_SFTP_PARALLEL": "1",
    }
    sleeps: list[float] = []
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(os.listdir(inbox)) >= 50:
                sftp_peer.kill_connections()
                killed.set()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = mirror(SftpSettings.from_env(env), sleep=sleeps.append)
    thread.join()
    assert killed.is_set()
    assert result.error is None, result.error
    assert len(result.downloaded) == len(data)
    assert sleeps == [0.05]  # one reconnect
    assert sorted(os.listdir(inbox)) == sorted(data)  # no partial file left
    for name, body in data.items():
        assert (inbox / name).read_bytes() == body


def test_small_files_are_flushed_once_per_batch_before_any_rename(
    sftp_peer: SftpPeer, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch path writes under temp names and renames only after one flush: when the
    flush is called no final name exists yet, and it is called once per batch, not per file."""
    count = sftp_mirror.SMALL_BATCH * 2 + 5
    data = {f"b{i:04}.csv": os.urandom(500 + i) for i in range(count)}
    for name, body in data.items():
        put(sftp_peer.root, name, body)
    flushes: list[list[str]] = []
    real = durable.sync_filesystems

    def watched(paths: list[Path]) -> None:
        finals = [p.parent / p.name[1:].rsplit(".", 2)[0] for p in paths]  # .NAME.HEX.partial
        assert all(p.name.endswith(sftp_mirror.PARTIAL_SUFFIX) and p.is_file() for p in paths)
        assert not any(f.exists() for f in finals)  # nothing of this batch in place yet
        flushes.append([f.name for f in finals])
        real(paths)

    monkeypatch.setattr(durable, "sync_filesystems", watched)
    result = mirror(settings_for(sftp_peer, inbox))
    assert result.error is None and {f.status for f in result.files} == {"downloaded"}
    batch = sftp_mirror.SMALL_BATCH
    assert sorted(len(names) for names in flushes) == [5, batch, batch]  # one flush a batch
    assert sorted(name for names in flushes for name in names) == sorted(data)
    for name, body in data.items():
        assert (inbox / name).read_bytes() == body
    assert sorted(p.name for p in inbox.iterdir()) == sorted(data)  # no temp name left


def test_a_failed_flush_keeps_the_batch_out_and_the_next_pass_fetches_it(
    sftp_peer: SftpPeer, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """syncfs reporting a write-back error (EIO): none of the batch's files is renamed into
    place, each is failed with the reason, no temp file stays; the next pass fetches them."""
    data = {f"e{i:03}.csv": os.urandom(700 + i) for i in range(10)}
    for name, body in data.items():
        put(sftp_peer.root, name, body)

    def broken(paths: list[Path]) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(paths[0]))

    monkeypatch.setattr(durable, "sync_filesystems", broken)
    first = mirror(settings_for(sftp_peer, inbox))
    assert {f.status for f in first.files} == {"failed"}
    assert all("Input/output error" in (f.reason or "") for f in first.files)
    assert list(inbox.iterdir()) == []
    monkeypatch.undo()
    again = mirror(settings_for(sftp_peer, inbox))
    assert {f.status for f in again.files} == {"downloaded"}
    for name, body in data.items():
        assert (inbox / name).read_bytes() == body


def test_the_fstat_sent_with_the_last_reads_sees_a_file_that_grew(
    sftp_peer: SftpPeer, tmp_path: Path
) -> None:
    """The change check's FSTAT goes out behind the last READ (one round trip less per file):
    it must still report the file as it is after the reads, so a file that grew since it was
    listed is seen as changed; an unchanged one reports the listed size and mtime."""
    listed = 3 * 1024 * 1024 + 5
    path = put(sftp_peer.root, "grows.csv", os.urandom(listed))
    mtime = int(path.stat().st_mtime)
    settings = settings_for(sftp_peer, tmp_path)
    transport = connect(settings, load_private_key(settings.key))
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        fd = os.open(tmp_path / "same", os.O_WRONLY | os.O_CREAT, 0o600)
        with sftp.open(str(path), "rb") as remote:
            try:
                assert sftp_mirror._read_pipelined(sftp, remote, listed, fd, depth=4) == (
                    listed,
                    (listed, mtime),
                )
            finally:
                os.close(fd)
        remote = sftp.open(str(path), "rb")
        with open(path, "ab") as fh:
            fh.write(b"more rows\n")
        fd = os.open(tmp_path / "grown", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            received, seen = sftp_mirror._read_pipelined(sftp, remote, listed, fd) or (0, None)
        finally:
            os.close(fd)
            remote.close()
        assert received == listed
        assert seen is not None and seen[0] == listed + len(b"more rows\n")
        assert sftp.listdir(str(sftp_peer.root)) == ["grows.csv"]  # the channel is in order
    finally:
        transport.close()
    assert (tmp_path / "same").read_bytes() == path.read_bytes()[:listed]


def test_a_long_round_trip_keeps_the_whole_depth_in_flight(
    sftp_peer: SftpPeer, tmp_path: Path
) -> None:
    """On a fast link (the OPEN came back within LONG_LINK) 4 MiB of READs are in flight: more
    would pile answers up in paramiko's buffer. After a long OPEN the whole depth (the
    bandwidth-delay product, SMT_SFTP_INFLIGHT_MB) goes out before the first answer is read."""
    size = sftp_mirror.PIPE_REQUEST * 100
    path = put(sftp_peer.root, "deep.csv", os.urandom(size))
    settings = settings_for(sftp_peer, tmp_path)
    transport = connect(settings, load_private_key(settings.key))
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sent_before_first_answer = []
        request, wait = sftp._async_request, sftp._read_response  # type: ignore[attr-defined]
        counter = {"sent": 0}

        def counting_request(fileobj, t, *args):  # type: ignore[no-untyped-def]
            counter["sent"] += 1
            return request(fileobj, t, *args)

        def first_wait(num=None):  # type: ignore[no-untyped-def]
            sent_before_first_answer.append(counter["sent"])
            return wait(num)

        sftp._async_request = counting_request  # type: ignore[attr-defined,method-assign]
        sftp._read_response = first_wait  # type: ignore[attr-defined,method-assign]
        for round_trip in (0.0, 0.05):
            fd = os.open(tmp_path / f"out-{round_trip}", os.O_WRONLY | os.O_CREAT, 0o600)
            with sftp.open(str(path), "rb") as remote:
                sent_before_first_answer.clear()
                counter["sent"] = 0
                try:
                    got = sftp_mirror._read_pipelined(
                        sftp, remote, size, fd, depth=128, round_trip=round_trip
                    )
                finally:
                    os.close(fd)
            assert got is not None and got[0] == size
            expected = sftp_mirror.PIPE_DEPTH_FLOOR if round_trip == 0.0 else 100 + 1  # + FSTAT
            assert sent_before_first_answer[0] == expected, (round_trip, sent_before_first_answer)
            assert (tmp_path / f"out-{round_trip}").read_bytes() == path.read_bytes()
    finally:
        transport.close()
