"""``durable.Batch``: many small files made durable with one flush, then renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smt_droplet import durable


def test_commit_places_every_file_with_its_mtime_and_leaves_no_temp(tmp_path: Path) -> None:
    batch = durable.Batch(mode=0o640, suffix=".partial")
    for i in range(5):
        batch.write(tmp_path / f"f{i}.csv", f"row {i}\n".encode(), mtime=1_700_000_000 + i)
    assert len(batch) == 5 and not any(p.name.startswith("f") for p in tmp_path.iterdir())
    placed = batch.commit()
    assert [(p.name, e) for p, e in placed] == [(f"f{i}.csv", None) for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}.csv" for i in range(5)]
    assert (tmp_path / "f3.csv").read_bytes() == b"row 3\n"
    assert int((tmp_path / "f3.csv").stat().st_mtime) == 1_700_000_003
    assert (tmp_path / "f3.csv").stat().st_mode & 0o777 == 0o640
    assert batch.commit() == []  # nothing pending any more


def test_without_syncfs_each_file_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "_syncfs", lambda: None)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    batch = durable.Batch()
    for i in range(3):
        batch.write(tmp_path / f"g{i}", b"x")
    assert all(error is None for _, error in batch.commit())
    assert len(synced) == 3


def test_one_syncfs_per_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(durable, "_syncfs", lambda: lambda fd: calls.append(fd) or 0)
    batch = durable.Batch()
    for i in range(20):
        batch.write(tmp_path / f"h{i}", b"y")
    batch.commit()
    assert len(calls) == 1


def test_a_failed_flush_places_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> int:
        import ctypes

        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(durable, "_syncfs", lambda: eio)
    batch = durable.Batch()
    batch.write(tmp_path / "a", b"1")
    batch.write(tmp_path / "b", b"2")
    placed = batch.commit()
    assert [p.name for p, _ in placed] == ["a", "b"]
    assert all(isinstance(e, OSError) and e.errno == 5 for _, e in placed)
    assert list(tmp_path.iterdir()) == []


def test_a_rename_that_fails_keeps_only_that_file_out(tmp_path: Path) -> None:
    batch = durable.Batch()
    batch.write(tmp_path / "ok", b"1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "child").write_bytes(b"")  # a non-empty directory cannot be replaced
    batch.write(tmp_path / "taken", b"2")
    placed = dict(batch.commit())
    assert placed[tmp_path / "ok"] is None and isinstance(placed[tmp_path / "taken"], OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "taken"]
    assert (tmp_path / "taken").is_dir()


def test_discard_removes_what_was_written(tmp_path: Path) -> None:
    batch = durable.Batch()
    batch.write(tmp_path / "c", b"3")
    batch.discard()
    assert list(tmp_path.iterdir()) == [] and batch.commit() == []


def test_real_syncfs_is_found_on_linux() -> None:
    assert durable._syncfs() is not None
