"""Remote completion (``SMT_REMOTE_COMPLETION``, off by default): once the app accepted a
file, delete it on SMT's SFTP server (``delete``) or move it into ``SMT_REMOTE_ARCHIVE_DIR``
(``move``, same relative path; OpenSSH's ``posix-rename``), so the remote listing stays short —
the completion strategies of NiFi's FetchSFTP and Redpanda Connect's ``delete_on_finish``.

Run by a pass after its posts are recorded, over the files the pass's sync listed:

* a file is completed only when the ledger lists the sha256 of its local copy (or of its
  retired copy, see :mod:`smt_droplet.retention`) and SFTP still shows it with the size and
  mtime that were downloaded — a file SMT rewrote since is left for the next sync;
* never before the post is recorded (the ledger is read after the posts);
* a failure is one WARNING line and is tried again by the next pass; it never makes anything
  post again (what is posted is decided by the ledger's digests, not by the remote listing).
"""

from __future__ import annotations

import logging
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import SftpSettings
from .ledger import Ledger

log = logging.getLogger("smt_droplet.ingest")

LISTED = ("unchanged", "downloaded", "retired")  # MirroredFile statuses with a local copy


@dataclass
class CompletionResult:
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def candidates(ledger: Ledger, files: Iterable[Any], local_dir: Any) -> list[Any]:
    """The listed files (``MirroredFile``) whose bytes the ledger records as posted."""
    chosen = []
    for f in files:
        if f.status not in LISTED:
            continue
        digest = ledger.retired_digest(f.rel, f.size, f.mtime)
        if digest is None:
            local = local_dir.joinpath(*f.rel.split("/"))
            try:
                st = local.stat()
            except FileNotFoundError:
                continue
            if st.st_size != f.size or int(st.st_mtime) != f.mtime:
                continue
            digest = ledger.cached_digest(f.rel, st.st_size, st.st_mtime_ns)
        if digest is not None and digest in ledger.posted:
            chosen.append(f)
    return chosen


def complete_posted(
    settings: SftpSettings, pkey: Any, mirrored: Any, state_file: Any
) -> CompletionResult:
    """Complete, on SFTP, every file of ``mirrored`` (the pass's ``MirrorResult``) that is
    posted. Never raises for a remote or connection error (they are logged and retried)."""
    result = CompletionResult()
    if settings.completion == "none" or mirrored is None or not mirrored.listed:
        return result
    todo = candidates(Ledger.load(state_file), mirrored.files, settings.local_dir)
    if not todo:
        return result
    import paramiko

    from .sftp_mirror import SyncError, connect

    try:
        transport = connect(settings, pkey)
    except (SyncError, OSError, paramiko.SSHException, EOFError) as exc:
        log.warning(
            "remote completion of %d file(s) not done: %s; the next pass tries again",
            len(todo),
            exc,
        )
        result.failed = [f.rel for f in todo]
        return result
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        if sftp is None:
            raise SyncError("the server refused the sftp subsystem")
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(settings.io_timeout)
        made: set[str] = set()
        for f in todo:
            _complete_one(sftp, settings, f, made, result)
    except (SyncError, OSError, paramiko.SSHException, EOFError) as exc:
        rest = [f.rel for f in todo if f.rel not in result.completed and f.rel not in result.failed]
        log.warning(
            "remote completion stopped (%s); %d file(s) left for the next pass", exc, len(rest)
        )
        result.failed.extend(rest)
    finally:
        transport.close()
    return result


def _complete_one(
    sftp: Any, settings: SftpSettings, f: Any, made: set[str], result: CompletionResult
) -> None:
    try:
        attr = sftp.stat(f.remote)
        if int(attr.st_size or 0) != f.size or int(attr.st_mtime or 0) != f.mtime:
            log.info("remote-kept %s: changed on SFTP since it was downloaded", f.rel)
            return
        if settings.completion == "delete":
            sftp.remove(f.remote)
            log.info("remote-deleted %s (posted)", f.rel)
        else:
            assert settings.completion_dir is not None
            target = posixpath.join(settings.completion_dir, f.rel)
            _makedirs(sftp, posixpath.dirname(target), made)
            sftp.posix_rename(f.remote, target)
            log.info("remote-moved %s to %s (posted)", f.rel, target)
        result.completed.append(f.rel)
    except OSError as exc:
        if isinstance(exc, ConnectionError):
            raise
        result.failed.append(f.rel)
        log.warning(
            "remote completion of %s failed: %s; the next pass tries again",
            f.rel,
            exc.strerror or exc,
        )


def _makedirs(sftp: Any, directory: str, made: set[str]) -> None:
    """``mkdir -p`` on SFTP (each directory asked once per pass)."""
    if directory in made or directory in ("", "/"):
        return
    try:
        if stat.S_ISDIR(sftp.stat(directory).st_mode or 0):
            made.add(directory)
            return
    except FileNotFoundError:
        pass
    _makedirs(sftp, posixpath.dirname(directory), made)
    sftp.mkdir(directory)
    made.add(directory)
