"""The SFTP mirror against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from smt_droplet import sftp_mirror
from smt_droplet.config import ConfigError, SftpSettings
from smt_droplet.sftp_mirror import HostKeyError, load_private_key, mirror
from testbed.sftp_peer import SftpPeer


def settings_for(peer: SftpPeer, inbox: Path, **env: str) -> SftpSettings:
    base = {**peer.env(), "SMT_LOCAL_DIR": str(inbox), "SMT_CONNECT_TIMEOUT": "5"}
    base.update(env)
    return SftpSettings.from_env(base)


def put(root: Path, rel: str, data: bytes, mtime: float | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_mirror_depth_patterns_and_mtime(sftp_peer: SftpPeer, inbox: Path) -> None:
    root = sftp_peer.root
    old = time.time() - 3600
    put(root, "a.csv", b"a\n", old)
    put(root, "B.CSV", b"b\n", old)  # case-insensitive
    put(root, "c.CSV.1.asc", b"c\n", old)  # *.csv.*
    put(root, "x_DailyMeterUsage_1.asc", b"d\n", old)
    put(root, "x_IntervalMeterUsage_2.asc", b"e\n", old)
    put(root, "notes.txt", b"no\n", old)
    put(root, "sub/deep.csv", b"f\n", old)
    put(root, "sub/sub2/too-deep.csv", b"g\n", old)
    put(root, ".hidden.csv", b"h\n", old)
    result = mirror(settings_for(sftp_peer, inbox))
    assert result.error is None
    got = sorted(f.rel for f in result.downloaded)
    assert got == sorted(
        ["a.csv", "B.CSV", "c.CSV.1.asc", "x_DailyMeterUsage_1.asc",
         "x_IntervalMeterUsage_2.asc", "sub/deep.csv"]
    )  # fmt: skip
    assert (inbox / "sub" / "deep.csv").read_bytes() == b"f\n"
    assert int((inbox / "a.csv").stat().st_mtime) == int(old)
    assert not (inbox / "notes.txt").exists() and not (inbox / "sub" / "sub2").exists()
    assert not list(inbox.rglob("*.partial"))


def test_unchanged_files_are_not_downloaded_again(sftp_peer: SftpPeer, inbox: Path) -> None:
    put(sftp_peer.root, "a.csv", b"first\n", time.time() - 100)
    settings = settings_for(sftp_peer, inbox)
    assert len(mirror(settings).downloaded) == 1
    (inbox / "a.csv").chmod(0o444)  # a re-download would replace the inode
    inode = (inbox / "a.csv").stat().st_ino
    again = mirror(settings)
    assert again.downloaded == [] and again.count("unchanged") == 1
    assert (inbox / "a.csv").stat().st_ino == inode
    put(sftp_peer.root, "a.csv", b"second version\n", time.time() - 50)
    third = mirror(settings)
    assert [f.rel for f in third.downloaded] == ["a.csv"]
    assert (inbox / "a.csv").read_bytes() == b"second version\n"


def test_dry_run_lists_and_downloads_nothing(sftp_peer: SftpPeer, inbox: Path) -> None:
    put(sftp_peer.root, "a.csv", b"a\n", time.time() - 100)
    result = mirror(settings_for(sftp_peer, inbox), dry_run=True)
    assert [(f.rel, f.status) for f in result.files] == [("a.csv", "would-download")]
    assert list(inbox.iterdir()) == []


def test_young_files_are_skipped(sftp_peer: SftpPeer, inbox: Path) -> None:
    put(sftp_peer.root, "new.csv", b"n\n")
    put(sftp_peer.root, "old.csv", b"o\n", time.time() - 600)
    result = mirror(settings_for(sftp_peer, inbox, SMT_MIN_AGE="120"))
    assert {f.rel: f.status for f in result.files} == {
        "new.csv": "skipped-young",
        "old.csv": "downloaded",
    }
    assert not (inbox / "new.csv").exists()


def test_file_growing_during_download_is_not_kept(sftp_peer: SftpPeer, inbox: Path) -> None:
    growing = put(sftp_peer.root, "growing.csv", b"x" * 20_000_000, time.time() - 600)
    stop = threading.Event()

    def writer() -> None:
        with open(growing, "ab") as fh:
            while not stop.is_set():
                fh.write(b"more,rows\n" * 100)
                fh.flush()
                time.sleep(0.002)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        result = mirror(settings_for(sftp_peer, inbox))
    finally:
        stop.set()
        thread.join()
    assert [f.status for f in result.files] == ["skipped-growing"]
    assert not (inbox / "growing.csv").exists()
    assert list(inbox.iterdir()) == []


def test_unknown_host_key_is_refused_with_a_pin_hint(sftp_peer: SftpPeer, inbox: Path) -> None:
    empty = inbox.parent / "empty_known_hosts"
    empty.write_text("")
    put(sftp_peer.root, "a.csv", b"a\n", time.time() - 100)
    with pytest.raises(HostKeyError, match="unknown") as info:
        mirror(settings_for(sftp_peer, inbox, SMT_KNOWN_HOSTS=str(empty)))
    assert "ssh-keyscan -p" in str(info.value)
    assert list(inbox.iterdir()) == []


def test_changed_host_key_is_refused(sftp_peer: SftpPeer, inbox: Path) -> None:
    put(sftp_peer.root, "a.csv", b"a\n", time.time() - 100)
    sftp_peer.rotate_host_key()
    with pytest.raises(HostKeyError, match="CHANGED") as info:
        mirror(settings_for(sftp_peer, inbox))
    assert "ssh-keygen -R" in str(info.value)
    # even accept-new never accepts a changed key
    with pytest.raises(HostKeyError, match="CHANGED"):
        mirror(settings_for(sftp_peer, inbox, SMT_HOST_KEY_POLICY="accept-new"))
    assert list(inbox.iterdir()) == []


def test_accept_new_records_the_key_then_pins_it(sftp_peer: SftpPeer, inbox: Path) -> None:
    known = inbox.parent / "fresh_known_hosts"
    put(sftp_peer.root, "a.csv", b"a\n", time.time() - 100)
    env = {"SMT_KNOWN_HOSTS": str(known), "SMT_HOST_KEY_POLICY": "accept-new"}
    assert len(mirror(settings_for(sftp_peer, inbox, **env)).downloaded) == 1
    line = known.read_text()
    assert line.startswith(f"[127.0.0.1]:{sftp_peer.port} ssh-ed25519 ")
    sftp_peer.rotate_host_key()
    with pytest.raises(HostKeyError, match="CHANGED"):
        mirror(settings_for(sftp_peer, inbox, **env))


def test_connection_failure_is_retried_then_reported(sftp_peer: SftpPeer, inbox: Path) -> None:
    settings = replace(settings_for(sftp_peer, inbox), port=1, retries=2, retry_base_delay=0.01)
    sleeps: list[float] = []
    result = mirror(settings, sleep=sleeps.append)
    assert result.error is not None and "after 3 attempts" in result.error
    assert sleeps == [0.01, 0.02]


def test_backoff_is_capped(sftp_peer: SftpPeer, inbox: Path) -> None:
    settings = replace(
        settings_for(sftp_peer, inbox), port=1, retries=4, retry_base_delay=1, retry_max_delay=3
    )
    sleeps: list[float] = []
    mirror(settings, sleep=sleeps.append)
    assert sleeps == [1, 2, 3, 3]


def test_missing_remote_dir_is_a_sync_error(sftp_peer: SftpPeer, inbox: Path) -> None:
    settings = replace(settings_for(sftp_peer, inbox), remote_dir="/nonexistent/dir", retries=0)
    result = mirror(settings)
    assert result.error and "/nonexistent/dir" in result.error


def test_bad_key_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "key"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="SMT_KEY"):
        load_private_key(str(bad))


def test_many_small_files_in_parallel(sftp_peer: SftpPeer, inbox: Path) -> None:
    old = time.time() - 100
    for i in range(60):
        put(sftp_peer.root, f"d{i % 3}/f{i:03}.csv", f"row {i}\n".encode() * 500, old)
    result = mirror(settings_for(sftp_peer, inbox, SMT_SFTP_PARALLEL="4"))
    assert len(result.downloaded) == 60 and result.error is None
    assert (inbox / "d1" / "f001.csv").read_bytes() == b"row 1\n" * 500


def test_small_file_growing_after_listing_is_not_kept(
    sftp_peer: SftpPeer, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small files take the one-request path; growth between the listing and the read must
    still be noticed. The file grows right after the listing is planned (deterministic: the
    download follows the listing on the same channel within a millisecond)."""
    growing = put(sftp_peer.root, "small.csv", b"ESIID,USAGE_KWH\n", time.time() - 600)
    plan = sftp_mirror._plan

    def plan_then_grow(*args, **kwargs):  # type: ignore[no-untyped-def]
        todo = plan(*args, **kwargs)
        with open(growing, "ab") as fh:
            fh.write(b"'10443720000000011,1.0\n")
        return todo

    monkeypatch.setattr(sftp_mirror, "_plan", plan_then_grow)
    result = mirror(settings_for(sftp_peer, inbox))
    assert [f.status for f in result.files] == ["skipped-growing"]
    assert result.files[0].size < sftp_mirror.SMALL_FILE  # listed small: the small path
    assert list(inbox.iterdir()) == []


def test_bytes_in_flight_are_a_bounded_setting(sftp_peer: SftpPeer, inbox: Path) -> None:
    """SMT_SFTP_INFLIGHT_MB sizes the READs outstanding per download (the link's
    bandwidth-delay product): 16 MiB unless set, refused above 256 or below 1, and a small
    value still moves a file many times its size."""
    assert settings_for(sftp_peer, inbox).inflight_bytes == 16 * 2**20
    for bad in ("0", "257"):
        with pytest.raises(ConfigError, match="SMT_SFTP_INFLIGHT_MB"):
            settings_for(sftp_peer, inbox, SMT_SFTP_INFLIGHT_MB=bad)
    data = os.urandom(5 * 2**20 + 3)
    put(sftp_peer.root, "big.csv", data, mtime=time.time() - 600)
    result = mirror(settings_for(sftp_peer, inbox, SMT_SFTP_INFLIGHT_MB="1"))
    assert result.error is None and [f.status for f in result.files] == ["downloaded"]
    assert (inbox / "big.csv").read_bytes() == data


def test_a_listing_longer_than_the_readdirs_in_flight_is_whole(
    sftp_peer: SftpPeer, inbox: Path
) -> None:
    """More entries than the READDIRs sent ahead answer at once (OpenSSH: ~100 per answer),
    plus a sub-directory: every file is listed once, and the channel stays usable."""
    names = {f"IntervalMeterUsage_{i:05d}.csv" for i in range(2500)}
    for name in names:
        put(sftp_peer.root, name, b"h\n", mtime=time.time() - 600)
    put(sftp_peer.root, "sub/IntervalMeterUsage_sub.csv", b"h\n", mtime=time.time() - 600)
    result = mirror(settings_for(sftp_peer, inbox), dry_run=True)
    listed = [f.rel for f in result.files]
    assert sorted(listed) == sorted([*names, "sub/IntervalMeterUsage_sub.csv"])
    assert result.error is None and not any(inbox.iterdir())
