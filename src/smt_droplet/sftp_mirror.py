"""Mirror SMT's SFTP drop into the local inbox: :func:`mirror`, and nothing else downloads.

* **Host key**: the server's key must match ``SMT_KNOWN_HOSTS`` (OpenSSH format, ``[host]:port``
  for a non-22 port, hashed names work). Unknown or changed → :class:`HostKeyError`, whose message
  says how to pin the key; the ingest pass then stops and posts nothing (exit 2). With
  ``SMT_HOST_KEY_POLICY=accept-new`` (never the default) an *unknown* host's key is recorded in
  the known-hosts file and used; a *changed* key is always refused.
* **Auth**: public key only (``SMT_KEY``: ed25519, ECDSA or RSA, unencrypted).
* **What**: files in ``SMT_REMOTE_DIR`` and its sub-directories down to ``max_depth`` (2: the
  directory itself and one level below; sub-directories become local sub-directories), whose
  base name matches one of ``SMT_INCLUDE`` (case-insensitive globs).
* **When**: a file already local with the same size and mtime is left alone, and so is one that
  retention took out of the inbox (``retired``, from the ledger) while SMT still lists it
  unchanged; a file younger than
  ``SMT_MIN_AGE`` seconds is skipped (SMT may still be writing it); a file whose size or mtime
  changes while it is read is discarded and retried next pass.
* **How**: into ``.<name>.<random>.partial`` in the destination directory (dot files are never
  posted), fsync, set the remote mtime, rename — an interrupted download never looks like a
  file. ``SMT_SFTP_PARALLEL`` (default 4) SFTP channels of one connection, the first being
  the one that listed the drop (the others open at the same time, not one after another):
  small files (< 32 KiB) go in batches per channel with ``SMALL_DEPTH`` files in flight
  (OPEN/READ/CLOSE pipelined), each batch flushed to disk once (``durable.Batch``: one
  ``syncfs`` before its renames, not an fsync per file); a large file is read with
  ``SMT_SFTP_INFLIGHT_MB`` (default 16) of READ requests of ``PIPE_REQUEST`` bytes in flight,
  each answer written at its offset. Over a long link what bounds a download is the bytes in
  flight per round trip: 16 MB fill 1 Gbit/s at a 128 ms round trip; each channel's SSH
  window is twice that (at least 64 MiB), which also bounds what can wait in memory.
* **Failures**: connecting is retried ``SMT_SFTP_RETRIES`` times with exponential backoff
  (``SMT_RETRY_BASE_DELAY`` * 2**n, capped at ``SMT_RETRY_MAX_DELAY``); then :class:`MirrorResult`
  carries the error and the pass goes on with what is local (exit 1). A connection that drops
  or goes silent for ``SMT_SFTP_IO_TIMEOUT`` seconds (default 60) mid-transfer counts against
  the same budget: the mirror reconnects after the backoff and fetches again only the files that
  were lost with it (their partial files are deleted first). Local errors (a full inbox) are not
  retried within the pass: the file is ``failed``, its partial file removed, and the next pass
  tries again.
* **Free space** (``SMT_MIN_FREE_MB``): files are downloaded only while the inbox's file system
  keeps that much free after them; the rest are ``skipped-no-space`` (one line says why) and
  ``MirrorResult.error`` makes the pass exit 1, so the alerts hear of it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import queue
import shutil
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

from . import durable, progress
from .config import ConfigError, SftpSettings
from .inbox import matches

log = logging.getLogger("smt_droplet.sftp")

WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET = 32768
REQUEST_SIZE = 32768  # what paramiko's readv asks for per READ request (the fallback)
READ_WINDOW = 8 * 1024 * 1024  # bytes requested ahead by the readv fallback
PIPE_REQUEST = 128 * 1024  # our READ requests for large files (OpenSSH serves up to 255 KiB)
PIPE_DEPTH = 128  # READ requests in flight per file by default (16 MiB: SMT_SFTP_INFLIGHT_MB)
PIPE_DEPTH_FLOOR = 32  # READ requests in flight (4 MiB) on a fast link (loopback, LAN)
# An OPEN answered slower than this (seconds) means a link worth filling: below it the floor's
# 4 MiB per round trip already carry 200 MB/s, more than a droplet's link.
LONG_LINK = 0.02
SMALL_FILE = 32768  # one SFTP READ request (paramiko asks for at most 32 KiB)
SMALL_BATCH = 64  # small files handed to one channel at a time
LIST_AHEAD = 8  # READDIR requests in flight (OpenSSH answers ~100 entries to each)
SMALL_DEPTH = 16  # small files in flight per channel (OPEN or READ sent, answer pending)
AEAD_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")  # preferred when offered
PARTIAL_SUFFIX = ".partial"  # a download in progress: `.<name>.<random>.partial` beside it

DOWNLOADED = "downloaded"
UNCHANGED = "unchanged"
WOULD_DOWNLOAD = "would-download"
SKIPPED_YOUNG = "skipped-young"
SKIPPED_GROWING = "skipped-growing"
FAILED = "failed"
RETIRED = "retired"  # taken out of the inbox by retention, unchanged on SFTP
SKIPPED_NO_SPACE = "skipped-no-space"


class HostKeyError(Exception):
    """The server's host key is unknown or changed; the message says how to pin it."""


class SyncError(Exception):
    """The SFTP server could not be reached, authenticated against or listed."""


@dataclass(slots=True)
class MirroredFile:
    """One remote file and what the mirror did with it.

    Slotted, with both paths derived from the shared roots: a pass holds one of these for every
    listed file (100,000 after years of deliveries), so each costs a few small objects, not two
    path strings and a ``Path``."""

    rel: str
    remote_dir: str  # the drop's root on the server (one string shared by every file)
    local_dir: Path  # the inbox (shared)
    size: int
    mtime: int
    status: str
    reason: str = ""
    connection_lost: bool = False  # failed because the connection dropped or stalled

    @property
    def remote(self) -> str:
        return posixpath.join(self.remote_dir, self.rel)

    @property
    def local(self) -> Path:
        return self.local_dir.joinpath(*self.rel.split("/"))


@dataclass
class MirrorResult:
    """Per-file results, and ``error`` if the sync as a whole failed."""

    files: list[MirroredFile] = field(default_factory=list)
    error: str | None = None
    listed: bool = False  # the remote listing completed (retired entries may be pruned)
    space_note: str | None = None  # why downloads stopped (the free-space guard)
    retired_before: set[str] = field(default_factory=set)  # the ledger's retired paths

    @property
    def downloaded(self) -> list[MirroredFile]:
        return [f for f in self.files if f.status == DOWNLOADED]

    @property
    def failed(self) -> bool:
        return self.error is not None or any(f.status == FAILED for f in self.files)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)


# -- names and patterns ---------------------------------------------------------------------


def _safe_component(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


# -- host keys ------------------------------------------------------------------------------


def host_id(host: str, port: int) -> str:
    """The known_hosts name OpenSSH uses: ``host`` on 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _load_known_hosts(path: str | None) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if path and os.path.exists(path):
        try:
            keys.load(path)
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"cannot read SMT_KNOWN_HOSTS={path}: {exc}") from exc
    return keys


def _pin_hint(settings: SftpSettings) -> str:
    target = settings.known_hosts or "/etc/ssh/smt_known_hosts"
    return (
        f"pin it: ssh-keyscan -p {settings.port} {settings.host} >> {target} "
        "(compare the fingerprint with the one SMT publishes) and set SMT_KNOWN_HOSTS"
    )


def verify_host_key(settings: SftpSettings, key: paramiko.PKey) -> None:
    """Accept the server key only if pinned (or, with accept-new, if the host is new)."""
    name = host_id(settings.host, settings.port)
    known = _load_known_hosts(settings.known_hosts)
    entry = known.lookup(name)
    if entry:
        pinned = entry.get(key.get_name())
        if pinned is not None and pinned.asbytes() == key.asbytes():
            return
        raise HostKeyError(
            f"host key for {name} CHANGED: server offers {key.get_name()} {fingerprint(key)}, "
            f"which is not the key pinned in {settings.known_hosts}; refusing to connect. "
            f"If SMT really rotated its key, verify the new fingerprint with SMT, remove the old "
            f"line (ssh-keygen -R '{name}' -f {settings.known_hosts}) and {_pin_hint(settings)}"
        )
    if settings.host_key_policy != "accept-new" or not settings.known_hosts:
        raise HostKeyError(
            f"host key for {name} is unknown ({key.get_name()} {fingerprint(key)}); "
            f"refusing to connect. {_pin_hint(settings)}"
        )
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(settings.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "accept-new: recorded host key for %s (%s %s) in %s",
        name,
        key.get_name(),
        fingerprint(key),
        settings.known_hosts,
    )


def _prefer_aead_ciphers(transport: paramiko.Transport) -> None:
    """Offer AES-GCM first where this paramiko has it (3.5.0 and later: Debian 13's 3.5, not
    Debian 12's 2.12). paramiko's own order puts it last, after the CTR ciphers; with CTR every
    32 KiB packet also costs an HMAC and paramiko's byte-by-byte MAC comparison in Python,
    which an AEAD cipher does inside its one decrypt call (bench/README.md, round 4: the
    transport thread's CPU per 200 MB about halves). OpenSSH offers both by default."""
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    first = tuple(c for c in AEAD_CIPHERS if c in offered)
    if first:
        options.ciphers = first + tuple(c for c in offered if c not in first)


def _prefer_pinned_key_types(transport: paramiko.Transport, settings: SftpSettings) -> None:
    """Ask the server for a key type we have pinned (else it may offer another one)."""
    entry = _load_known_hosts(settings.known_hosts).lookup(host_id(settings.host, settings.port))
    if not entry:
        return
    wanted: list[str] = []
    for keytype in entry.keys():
        if keytype == "ssh-rsa":
            wanted += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        else:
            wanted.append(keytype)
    options = transport.get_security_options()
    usable = tuple(t for t in options.key_types if t in wanted)
    if usable:
        options.key_types = usable


# -- keys -----------------------------------------------------------------------------------


def load_private_key(path: str) -> paramiko.PKey:
    """Load ``SMT_KEY``; any problem is a :class:`ConfigError` (exit 2, before the network)."""
    classes = [
        getattr(paramiko, name)
        for name in ("Ed25519Key", "ECDSAKey", "RSAKey")
        if hasattr(paramiko, name)
    ]
    last: Exception | None = None
    for cls in classes:
        try:
            return cls.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            msg = f"SMT_KEY={path} is passphrase-protected; use an unencrypted key"
            raise ConfigError(msg) from None
        except (paramiko.SSHException, ValueError) as exc:
            last = exc
        except OSError as exc:
            raise ConfigError(f"SMT_KEY={path}: {exc.strerror or exc}") from exc
    raise ConfigError(f"SMT_KEY={path} is not a usable private key ({last})")


# -- connection -----------------------------------------------------------------------------


def connect(settings: SftpSettings, pkey: paramiko.PKey) -> paramiko.Transport:
    """One authenticated SSH transport with a pinned host key."""
    try:
        sock = socket.create_connection(
            (settings.host, settings.port), timeout=settings.connect_timeout
        )
    except OSError as exc:
        raise SyncError(
            f"cannot connect to {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    transport = paramiko.Transport(
        sock,
        default_window_size=max(WINDOW_SIZE, 2 * settings.inflight_bytes),
        default_max_packet_size=MAX_PACKET,
    )
    try:
        _prefer_pinned_key_types(transport, settings)
        _prefer_aead_ciphers(transport)
        transport.start_client(timeout=settings.connect_timeout)
        verify_host_key(settings, transport.get_remote_server_key())
        transport.auth_publickey(settings.user, pkey)
    except HostKeyError:
        transport.close()
        raise
    except paramiko.AuthenticationException as exc:
        transport.close()
        raise SyncError(f"authentication as {settings.user} failed: {exc}") from exc
    except (paramiko.SSHException, OSError, EOFError) as exc:
        transport.close()
        raise SyncError(f"SSH handshake with {settings.host}:{settings.port}: {exc}") from exc
    return transport


def _backoff(settings: SftpSettings, attempt: int) -> float:
    return float(min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempt - 1)))


Listed = tuple[str, int, int]  # (relative path, size, mtime) of one remote file


def _walk_remote(
    sftp: paramiko.SFTPClient, root: str, include: tuple[str, ...], max_depth: int
) -> Iterator[Listed]:
    """Yield (relative path, size, mtime) of matching regular files, depth-limited, sorted by
    name. ``listdir_iter`` and a tuple per entry: the listing of a directory of 100,000 files is
    never held as paramiko attribute objects."""
    pending: list[tuple[str, int]] = [("", 1)]
    while pending:
        rel_dir, depth = pending.pop(0)
        remote_dir = posixpath.join(root, rel_dir) if rel_dir else root
        entries = sorted(
            (a.filename, a.st_mode, int(a.st_size or 0), int(a.st_mtime or 0))
            for a in _listdir(sftp, remote_dir)
            if a.st_mode is not None and _safe_component(a.filename)
        )
        for name, mode, size, mtime in entries:
            rel = posixpath.join(rel_dir, name) if rel_dir else name
            if stat.S_ISDIR(mode):
                if depth < max_depth and not name.startswith("."):
                    pending.append((rel, depth + 1))
            elif stat.S_ISREG(mode) and matches(name, include):
                yield rel, size, mtime


def _listdir(sftp: paramiko.SFTPClient, path: str) -> Iterator[paramiko.SFTPAttributes]:
    """The entries of ``path`` (``.`` and ``..`` left out) as ``listdir_iter`` gives them, but
    its CLOSE is sent without waiting for the answer: one round trip less per directory, which
    on a long link is a tenth of a second off every pass. READDIRs go out ``LIST_AHEAD`` at a
    time; answers left over after the end of the directory are absorbed later."""
    request = getattr(sftp, "_async_request", None)
    wait = getattr(sftp, "_read_response", None)
    if request is None or wait is None:
        yield from sftp.listdir_iter(path)
        return
    from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR

    t, msg = sftp._request(CMD_OPENDIR, path)  # type: ignore[attr-defined]
    if t != CMD_HANDLE:
        raise paramiko.SFTPError("expected a handle for OPENDIR")
    handle = msg.get_binary()
    replies = _Replies()
    try:
        while True:
            nums = [request(replies, CMD_READDIR, handle) for _ in range(LIST_AHEAD)]
            for num in nums:
                msg = _reply(sftp, replies, wait, num, CMD_NAME, "READDIR")  # EOF ends it
                for _ in range(msg.get_int()):
                    name = msg.get_text()
                    longname = msg.get_text()
                    attrs = paramiko.SFTPAttributes._from_msg(  # type: ignore[attr-defined]
                        msg, name, longname
                    )
                    if name not in (".", ".."):
                        yield attrs
    except EOFError:
        return
    finally:
        with contextlib.suppress(Exception):  # a dead channel: its own error is the one to see
            request(type(None), CMD_CLOSE, handle)


def _remove_stale_partials(local_dir: Path, max_depth: int) -> None:
    """Leftovers of a killed download (we hold the pass lock, so none is in progress)."""
    dirs = [(local_dir, 1)]
    while dirs:
        directory, depth = dirs.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif depth < max_depth and entry.is_dir(follow_symlinks=False):
                dirs.append((Path(entry.path), depth + 1))


def _read_small(remote: paramiko.SFTPFile, size: int) -> bytes | None:
    """One READ request for ``size + 1`` bytes: more than ``size`` back means the file grew.

    Saves the prefetch thread and two round trips (EOF probe, fstat) per small file, which is
    what makes thousands of small SMT files mirror as fast as OpenSSH's ``sftp mget``. Uses
    paramiko's single-request ``_read`` (present in 2.x to 5.x); ``None`` if it is missing.
    """
    single = getattr(remote, "_read", None)
    if single is None:
        return None
    data = single(size + 1)
    return data or b""


# The terminal's progress bar of the running mirror (progress.py; a NullBar otherwise).
_progress: Any = progress.NullBar()


def _read_windowed(remote: paramiko.SFTPFile, size: int, out: BinaryIO) -> int:
    """Read ``size`` bytes with many READ requests in flight, a window of ``READ_WINDOW`` at a
    time. paramiko's plain ``prefetch`` of a whole 200 MB file queues thousands of requests and
    scans its buffer dict on every read (quadratic); bounded ``readv`` batches keep it linear
    on every paramiko version from 2.12 on."""
    received = 0
    for start in range(0, size, READ_WINDOW):
        end = min(size, start + READ_WINDOW)
        chunks = [(o, min(REQUEST_SIZE, end - o)) for o in range(start, end, REQUEST_SIZE)]
        for data in remote.readv(chunks):
            out.write(data)
            received += len(data)
            _progress.update(len(data))
    return received


class _Replies:
    """Where paramiko puts answers to our READ requests that arrive while it waits for another
    one (and answers to requests still in flight when a read stopped early)."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.got[num] = (t, msg)


def _reply(
    sftp: paramiko.SFTPClient,
    replies: _Replies,
    wait: Callable[[int], tuple[int, paramiko.Message]],
    num: int,
    wanted: int,
    what: str,
) -> paramiko.Message:
    """The answer to request ``num`` (already arrived, or waited for), of type ``wanted``; a
    status answer raises what paramiko raises for it (EOFError at the end of a file or a
    directory, OSError & co.)."""
    answer = replies.got.pop(num, None)
    t, msg = answer if answer is not None else wait(num)
    if t != wanted:
        sftp._convert_status(msg)  # type: ignore[attr-defined]
        raise paramiko.SFTPError(f"unexpected answer {t} to {what}")
    return msg


def _int64_type() -> type[int]:
    """The int subclass paramiko's request packer writes as a 64-bit integer: ``int64`` in
    ``paramiko.sftp`` (3.x and later), ``long`` in ``paramiko.py3compat`` (2.x, Debian 12)."""
    try:
        from paramiko.sftp import int64
    except ImportError:
        from paramiko.py3compat import long as int64  # type: ignore[no-redef,import-not-found]
    return int64


def _read_pipelined(
    sftp: paramiko.SFTPClient,
    remote: paramiko.SFTPFile,
    size: int,
    fd: int,
    depth: int = PIPE_DEPTH,
    round_trip: float = 1.0,
) -> tuple[int, tuple[int, int] | None] | None:
    """Read ``size`` bytes with ``depth`` READ requests of ``PIPE_REQUEST`` bytes in flight
    and ``os.pwrite`` each answer at its offset; returns the bytes received (fewer than ``size``
    if the file shrank) and the file's (size, mtime) once read, or ``None`` if this paramiko
    lacks the request API (2.x to 5.x have it).

    ``depth`` requests (the bandwidth-delay product) are kept in flight when ``round_trip``
    (the file's OPEN took that long) is over ``LONG_LINK``: a real round trip, not loopback
    or a LAN, where ``PIPE_DEPTH_FLOOR`` (4 MiB) are. On a fast link the reader is
    the bottleneck and more in flight only piles answers up in paramiko's receive buffer,
    whose every read moves what is left in it: a fixed 16 MiB made a 200 MB loopback
    download 3x slower.

    The FSTAT that checks the file did not change while it was read goes out right after the
    last READ, not after its answer: the server answers in order, so it still sees the file as
    it was after the last read, one round trip sooner. (``None`` for the attributes if it could
    not be sent that way; the caller asks again.)

    paramiko's ``readv`` splits every range into 32 KiB requests and hands each answer through
    its prefetch thread; 128 KiB requests kept in flight continuously halve the CPU per byte
    and about double the throughput. A server that answers with less than asked (a smaller
    read limit) gets the remainder asked again and smaller requests from then on.
    """
    request = getattr(sftp, "_async_request", None)
    wait = getattr(sftp, "_read_response", None)
    handle = getattr(remote, "handle", None)
    if request is None or wait is None or handle is None:
        return None
    from paramiko.sftp import CMD_ATTRS, CMD_DATA, CMD_FSTAT, CMD_READ

    int64 = _int64_type()
    replies = _Replies()
    inflight: deque[tuple[int, int, int]] = deque()
    chunk = PIPE_REQUEST
    offset = received = 0
    fstat: int | None = None  # the FSTAT's request number, once every READ is out
    limit = depth if round_trip > LONG_LINK else min(depth, PIPE_DEPTH_FLOOR)
    try:
        while offset < size or inflight:
            while offset < size and len(inflight) < limit:
                length = min(chunk, size - offset)
                num = request(replies, CMD_READ, handle, int64(offset), int(length))
                inflight.append((num, offset, length))
                offset += length
            if offset >= size and fstat is None:
                fstat = request(replies, CMD_FSTAT, handle)
            num, at, length = inflight.popleft()
            data = _reply(sftp, replies, wait, num, CMD_DATA, "READ").get_string()
            if not data:
                raise EOFError("empty READ answer")
            os.pwrite(fd, data, at)
            received += len(data)
            if len(data) < length:  # a short answer: ask for the rest, and less from now on
                chunk = max(len(data), 4096)
                rest = at + len(data)
                num = request(replies, CMD_READ, handle, int64(rest), int(length - len(data)))
                inflight.append((num, rest, length - len(data)))
                fstat = -1  # a READ after the FSTAT: its answer says nothing; ask again
    except EOFError:  # the file is shorter than listed: the caller sees received < size
        return received, None
    if fstat is None or fstat < 0:
        return received, None
    msg = _reply(sftp, replies, wait, fstat, CMD_ATTRS, "FSTAT")
    attrs = paramiko.SFTPAttributes._from_msg(msg)  # type: ignore[attr-defined]
    return received, (int(attrs.st_size or 0), int(attrs.st_mtime or 0))


def _close_without_waiting(remote: paramiko.SFTPFile) -> None:
    """Send CLOSE and do not wait for its answer (the server handles requests in order, and
    paramiko consumes the late answer): one round trip less per file. ``with`` closes again,
    which is a no-op then."""
    close_async = getattr(remote, "_close", None)
    if close_async is None:
        return
    try:
        close_async(async_=True)
    except TypeError:  # a paramiko without the async_ flag: the normal close runs later
        return


# What a dropped or silent connection raises (a local ENOSPC is a plain OSError, not this).
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, TimeoutError, ConnectionError)


def _channel(sftp: paramiko.SFTPClient) -> paramiko.Channel:
    channel = sftp.get_channel()
    if channel is None:  # only for a client built without one, which we never do
        raise SyncError("the sftp session has no channel")
    return channel


def _connection_gone(sftp: paramiko.SFTPClient) -> bool:
    channel = sftp.get_channel()
    if channel is None or channel.closed:
        return True
    transport = channel.get_transport()
    return transport is None or not transport.is_active()


def _download(
    sftp: paramiko.SFTPClient, item: MirroredFile, depth: int = PIPE_DEPTH
) -> MirroredFile:
    """Fetch one file into a temp name, check it did not change meanwhile, rename it."""
    item.local.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temp_path(item.local, PARTIAL_SUFFIX)
    try:
        received, after_size, after_mtime = _fetch_into(sftp, item, tmp, depth)
        if received != item.size or after_size != item.size or after_mtime != item.mtime:
            durable.remove_quietly(tmp)
            return _changed_while_reading(item, received)
        _into_place(item, tmp)
    except (OSError, paramiko.SSHException, EOFError) as exc:
        durable.remove_quietly(tmp)
        _failed(item, exc, sftp)
    return item


def _fetch_into(
    sftp: paramiko.SFTPClient, item: MirroredFile, tmp: Path, depth: int
) -> tuple[int, int, int]:
    """Read ``item`` into ``tmp`` (fsynced); returns (bytes read, size and mtime after)."""
    after_size, after_mtime = item.size, item.mtime
    began = time.monotonic()
    remote = sftp.open(item.remote, "rb")
    round_trip = time.monotonic() - began
    try:
        with open(tmp, "wb") as out:
            small = _read_small(remote, item.size) if item.size < SMALL_FILE else None
            if small is not None:
                out.write(small)
                received = len(small)
            else:
                piped = _read_pipelined(sftp, remote, item.size, out.fileno(), depth, round_trip)
                received, seen = piped or (_read_windowed(remote, item.size, out), None)
                if seen is None:
                    after = remote.stat()
                    seen = int(after.st_size or 0), int(after.st_mtime or 0)
                after_size, after_mtime = seen
            _close_without_waiting(remote)
            out.flush()
            os.fsync(out.fileno())
    except _CONNECTION_ERRORS:
        # A dead or silent channel: do not wait another timeout for CLOSE's answer.
        with contextlib.suppress(Exception):
            _channel(sftp).close()
        raise
    finally:
        remote.close()
    return received, after_size, after_mtime


def _store(item: MirroredFile, data: bytes, batch: durable.Batch, made: set[Path]) -> bool:
    """Write a small file read in one request (``size + 1`` asked) into ``batch``; ``True``
    when it waits there for :func:`_commit` (else its status says why not). ``made``: the
    directories already made by this batch."""
    if len(data) != item.size:
        _changed_while_reading(item, len(data))
        return False
    try:
        local = item.local
        if local.parent not in made:
            local.parent.mkdir(parents=True, exist_ok=True)
            made.add(local.parent)
        batch.write(local, data, mtime=item.mtime)
    except OSError as exc:
        _failed(item, exc)
        return False
    return True


def _commit(batch: durable.Batch, stored: list[MirroredFile]) -> None:
    """Flush the batch once and rename its files into place: ``stored`` (in the order they
    were written) become downloaded, or failed with the reason."""
    for item, (_, error) in zip(stored, batch.commit(), strict=True):
        if error is None:
            item.status = DOWNLOADED
        else:
            _failed(item, error)
    stored.clear()


# -- how a download ends (both paths above) ----------------------------------------------------


def _changed_while_reading(item: MirroredFile, received: int) -> MirroredFile:
    item.status = SKIPPED_GROWING
    item.reason = f"changed while reading (listed {item.size} bytes, read {received})"
    return item


def _into_place(item: MirroredFile, tmp: Path) -> None:
    durable.place(tmp, item.local, mtime=item.mtime, sync_dir=False)
    item.status = DOWNLOADED


def _failed(
    item: MirroredFile, exc: BaseException, sftp: paramiko.SFTPClient | None = None
) -> None:
    item.status = FAILED
    if sftp is not None:
        item.connection_lost = isinstance(exc, _CONNECTION_ERRORS) or _connection_gone(sftp)
    item.reason = str(exc).rstrip(": ") or type(exc).__name__
    if isinstance(exc, TimeoutError):
        item.reason = "no data within SMT_SFTP_IO_TIMEOUT (connection stalled)"
    elif isinstance(exc, OSError) and exc.errno is not None:
        item.reason = f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"


def _answer(
    sftp: paramiko.SFTPClient,
    replies: _Replies,
    wait: Callable[[int], tuple[int, paramiko.Message]],
    num: int,
    handle: bytes | None,
    wanted: tuple[int, ...],
) -> paramiko.Message | None:
    """The answer to request ``num`` (already arrived, or waited for); ``None`` is the EOF of an
    empty file's READ. A status answer raises what paramiko raises for it (OSError & co.)."""
    answer = replies.got.pop(num, None)
    try:
        t, msg = answer if answer is not None else wait(num)
    except EOFError:  # READ at offset 0 of an empty file
        if handle is None:
            raise paramiko.SSHException("EOF answering OPEN") from None
        return None
    if t not in wanted:
        try:
            sftp._convert_status(msg)  # type: ignore[attr-defined]  # OSError (EOFError: empty file)
        except EOFError:
            if handle is None:
                raise paramiko.SSHException("EOF answering OPEN") from None
            return None
        raise paramiko.SFTPError(f"unexpected answer {t}")
    return msg


def _download_small_batch(sftp: paramiko.SFTPClient, items: list[MirroredFile]) -> bool:
    """Fetch small files with ``SMALL_DEPTH`` of them in flight on one channel: OPEN for the
    next files goes out before the earlier answers are read, each answered OPEN gets its one
    READ (``size + 1`` bytes: more back means the file grew), each answered READ its CLOSE
    (not waited for). Per file that replaces two waits for the server with none, most of the
    time. Returns ``False`` (items untouched) if this paramiko lacks the request API."""
    request = getattr(sftp, "_async_request", None)
    wait = getattr(sftp, "_read_response", None)
    if request is None or wait is None:
        return False
    from paramiko.sftp import (
        CMD_CLOSE,
        CMD_DATA,
        CMD_HANDLE,
        CMD_OPEN,
        CMD_READ,
        SFTP_FLAG_READ,
    )

    int64 = _int64_type()

    replies = _Replies()
    todo = deque(items)
    batch = durable.Batch(mode=0o644, suffix=PARTIAL_SUFFIX)
    stored: list[MirroredFile] = []  # written into the batch, not yet committed
    made: set[Path] = set()
    # (request number, item, handle): handle None while the OPEN is outstanding
    inflight: deque[tuple[int, MirroredFile, bytes | None]] = deque()
    try:
        while todo or inflight:
            while todo and len(inflight) < SMALL_DEPTH:
                item = todo.popleft()
                attrs = paramiko.SFTPAttributes()
                num = request(replies, CMD_OPEN, item.remote, SFTP_FLAG_READ, attrs)
                inflight.append((num, item, None))
            num, item, handle = inflight.popleft()
            try:
                msg = _answer(sftp, replies, wait, num, handle, (CMD_HANDLE, CMD_DATA))
            except (OSError, paramiko.SFTPError) as exc:  # this file only (vanished, denied)
                if isinstance(exc, _CONNECTION_ERRORS):
                    raise
                if handle is not None:
                    request(type(None), CMD_CLOSE, handle)
                item.status = FAILED
                item.reason = str(exc).rstrip(": ") or type(exc).__name__
                continue
            if handle is None:
                assert msg is not None  # _answer returns None only for a READ
                handle = msg.get_binary()
                num = request(replies, CMD_READ, handle, int64(0), int(item.size + 1))
                inflight.append((num, item, handle))
                continue
            request(type(None), CMD_CLOSE, handle)  # the answer is dropped when it arrives
            if _store(item, b"" if msg is None else msg.get_string(), batch, made):
                stored.append(item)
            _progress.update(item.size)
        _commit(batch, stored)
    except _CONNECTION_ERRORS as exc:
        _commit(batch, stored)  # what arrived whole is kept
        _connection_lost(sftp, items, exc)
    finally:
        batch.discard()  # only after an unexpected error: nothing is left under temp names
    return True


def _connection_lost(sftp: paramiko.SFTPClient, items: list[MirroredFile], exc: Exception) -> None:
    """The channel died mid-batch: every file not yet finished waits for the reconnect."""
    reason = str(exc).rstrip(": ") or type(exc).__name__
    if isinstance(exc, TimeoutError):
        reason = "no data within SMT_SFTP_IO_TIMEOUT (connection stalled)"
    for item in items:
        if item.status == WOULD_DOWNLOAD:
            item.status, item.reason, item.connection_lost = FAILED, reason, True
    with contextlib.suppress(Exception):
        _channel(sftp).close()


def mirror(
    settings: SftpSettings,
    *,
    dry_run: bool = False,
    pkey: paramiko.PKey | None = None,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    retired: Mapping[str, list[Any]] | None = None,
) -> MirrorResult:
    """Mirror the remote drop into ``settings.local_dir``; see the module docstring.

    ``retired``: the ledger's retired files (``Ledger.retired``), not downloaded again while
    SFTP lists them unchanged.

    Raises :class:`HostKeyError` (the pass must stop) and :class:`ConfigError` (bad key); any
    other failure is in the result's ``error`` / per-file ``status``.
    """
    if pkey is None:
        pkey = load_private_key(settings.key)
    result = MirrorResult()
    todo: list[MirroredFile] | None = None  # planned after the first successful listing
    pending: list[MirroredFile] = []
    attempt = 0
    while True:
        attempt += 1
        try:
            with _connected(settings, pkey) as transport:
                lister = None  # the listing's channel downloads too: 3 round trips saved
                if todo is None:
                    lister = _open_sftp(transport, settings.io_timeout)
                    listing = _list_remote(lister, settings)
                    result.listed = True
                    todo = _plan(settings, listing, result, now(), retired or {})
                    del listing  # the plan holds what is needed
                    if not dry_run:
                        todo = _within_free_space(settings, todo, result)
                    if dry_run or not todo:
                        return result
                    _remove_stale_partials(settings.local_dir, settings.max_depth)
                    pending = todo
                _download_with_progress(transport, pending, settings, lister)
        except (SyncError, OSError, paramiko.SSHException, EOFError) as exc:
            reason = _failure_reason(exc, settings)
            if attempt > settings.retries:
                _give_up(result, pending, attempt, reason)
                return result
            delay = _backoff(settings, attempt)
            log.warning("sftp attempt %d failed (%s); retrying in %.1fs", attempt, reason, delay)
            sleep(delay)
            continue
        lost = [f for f in pending if f.status == FAILED and f.connection_lost]
        if not lost or attempt > settings.retries:
            break
        sleep(_log_reconnect(settings, lost, attempt))
        pending = _requeue(lost)
    assert todo is not None  # the loop leaves only after a listing (or returns)
    _note_failed_downloads(result, todo)
    return result


def _within_free_space(
    settings: SftpSettings, todo: list[MirroredFile], result: MirrorResult
) -> list[MirroredFile]:
    """The files that fit above ``SMT_MIN_FREE_MB``, in listing order; the rest wait."""
    if not settings.min_free_bytes:
        return todo
    try:
        free = shutil.disk_usage(settings.local_dir).free
    except OSError:
        return todo  # the download itself will say what is wrong with the inbox
    budget = free - settings.min_free_bytes
    fits: list[MirroredFile] = []
    for item in todo:
        if item.size <= budget:
            budget -= item.size
            fits.append(item)
        else:
            item.status, item.reason = SKIPPED_NO_SPACE, "below SMT_MIN_FREE_MB"
    waiting = [f for f in todo if f.status == SKIPPED_NO_SPACE]
    if waiting:
        result.space_note = (
            f"downloads stopped: {free / 2**20:.0f} MiB free on {settings.local_dir}, "
            f"SMT_MIN_FREE_MB={settings.min_free_bytes // 2**20}; {len(waiting)} file(s) of "
            f"{sum(f.size for f in waiting) / 2**20:.1f} MiB wait for space, first {waiting[0].rel}"
        )
        log.error("%s", result.space_note)
        result.error = result.space_note  # the pass exits 1 (downloads failed would replace it)
    return fits


@contextlib.contextmanager
def _connected(settings: SftpSettings, pkey: paramiko.PKey) -> Iterator[paramiko.Transport]:
    transport = connect(settings, pkey)
    try:
        yield transport
    finally:
        transport.close()


def _open_sftp(transport: paramiko.Transport, io_timeout: float) -> paramiko.SFTPClient:
    """One SFTP channel (open, subsystem, version: three round trips) with the I/O timeout."""
    client = paramiko.SFTPClient.from_transport(transport)
    if client is None:
        raise SyncError("the server refused the sftp subsystem")
    _channel(client).settimeout(io_timeout)
    return client


def _list_remote(lister: paramiko.SFTPClient, settings: SftpSettings) -> list[Listed]:
    return list(_walk_remote(lister, settings.remote_dir, settings.include, settings.max_depth))


def _failure_reason(exc: BaseException, settings: SftpSettings) -> str:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, IOError) and not isinstance(exc, SyncError):
        reason = f"listing {settings.remote_dir}: {reason}"
    return reason


def _give_up(result: MirrorResult, pending: list[MirroredFile], attempt: int, reason: str) -> None:
    result.error = f"sync failed after {attempt} attempts: {reason}"
    for item in pending:  # a reconnect for lost downloads failed
        if item.status == WOULD_DOWNLOAD:
            item.status, item.reason = FAILED, f"reconnect failed: {reason}"


def _log_reconnect(settings: SftpSettings, lost: list[MirroredFile], attempt: int) -> float:
    delay = _backoff(settings, attempt)
    log.warning(
        "connection lost during %d download(s), first %s (%s); reconnecting in %.1fs "
        "(attempt %d of %d)",
        len(lost),
        lost[0].rel,
        lost[0].reason,
        delay,
        attempt + 1,
        settings.retries + 1,
    )
    return delay


def _requeue(lost: list[MirroredFile]) -> list[MirroredFile]:
    for item in lost:
        item.status, item.reason, item.connection_lost = WOULD_DOWNLOAD, "", False
    return lost


def _note_failed_downloads(result: MirrorResult, todo: list[MirroredFile]) -> None:
    failed = [f for f in todo if f.status == FAILED]
    if failed:
        result.error = f"{len(failed)} download(s) failed, first: {failed[0].rel}: " + (
            failed[0].reason
        )


def _plan(
    settings: SftpSettings,
    listing: list[Listed],
    result: MirrorResult,
    now: float,
    retired: Mapping[str, list[Any]],
) -> list[MirroredFile]:
    """Record every listed file in ``result``; return those to download."""
    todo: list[MirroredFile] = []
    cutoff = now - settings.min_age
    local_root = str(settings.local_dir)
    for rel, size, mtime in listing:
        item = MirroredFile(rel, settings.remote_dir, settings.local_dir, size, mtime, UNCHANGED)
        result.files.append(item)
        try:
            st = os.stat(os.path.join(local_root, rel))
            if st.st_size == size and int(st.st_mtime) == mtime:
                continue
        except FileNotFoundError:
            entry = retired.get(rel)
            if entry and entry[0] == size and entry[1] == mtime:
                item.status = RETIRED
                continue
        if settings.min_age and mtime > cutoff:
            item.status = SKIPPED_YOUNG
            item.reason = f"younger than SMT_MIN_AGE={settings.min_age:g}s"
            continue
        item.status = WOULD_DOWNLOAD
        todo.append(item)
    return todo


def _download_with_progress(
    transport: paramiko.Transport,
    todo: list[MirroredFile],
    settings: SftpSettings,
    first: paramiko.SFTPClient | None = None,
) -> None:
    """:func:`_download_all` with a bytes bar in a terminal (files, bytes, rate, ETA)."""
    global _progress
    total = sum(f.size for f in todo)
    with progress.bar(total, "B", f"sync {len(todo)} file(s)") as shown:
        _progress = shown
        try:
            _download_all(transport, todo, settings, first)
        finally:
            _progress = progress.NullBar()


def _download_all(
    transport: paramiko.Transport,
    todo: list[MirroredFile],
    settings: SftpSettings,
    first: paramiko.SFTPClient | None = None,
) -> None:
    """Download ``todo`` over up to ``settings.parallel`` channels of one connection (``first``,
    an open one, among them), no more channels than there are tasks."""
    opened: list[paramiko.SFTPClient] = [first] if first is not None else []
    lost = threading.Event()  # once the connection is gone, the rest waits for a reconnect
    depth = max(1, settings.inflight_bytes // PIPE_REQUEST)
    tasks = _tasks(todo)
    try:
        wanted = max(1, min(settings.parallel, len(tasks)))
        opened += _open_channels(transport, wanted - len(opened), settings.io_timeout)
        if not opened:
            _mark_lost(todo, "cannot open an sftp channel")
            return
        clients: queue.Queue[paramiko.SFTPClient] = queue.Queue()
        for client in opened:
            clients.put(client)

        def run(task: list[MirroredFile]) -> None:
            if lost.is_set():
                _mark_lost(task, "not tried: the connection was lost")
                return
            client = clients.get()
            try:
                _download_task(client, task, depth)
                if any(item.connection_lost for item in task):
                    lost.set()
            finally:
                clients.put(client)

        if len(opened) == 1:
            for task in tasks:
                run(task)
        else:
            with ThreadPoolExecutor(max_workers=len(opened)) as pool:
                list(pool.map(run, tasks))
    except (paramiko.SSHException, OSError, EOFError) as exc:
        _mark_lost([f for f in todo if f.status == WOULD_DOWNLOAD], str(exc) or type(exc).__name__)
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                client.close()


def _open_channels(
    transport: paramiko.Transport, count: int, io_timeout: float
) -> list[paramiko.SFTPClient]:
    """``count`` more SFTP channels, opened at the same time (each takes three round trips);
    those the server refuses are left out."""
    if count <= 0:
        return []

    def one(_: int) -> paramiko.SFTPClient | None:
        try:
            return _open_sftp(transport, io_timeout)
        except SyncError:
            return None

    with ThreadPoolExecutor(max_workers=count) as pool:
        return [client for client in pool.map(one, range(count)) if client is not None]


def _tasks(todo: list[MirroredFile]) -> list[list[MirroredFile]]:
    """Small files in batches (pipelined on one channel), large ones one by one."""
    small = [f for f in todo if f.size < SMALL_FILE]
    tasks = [small[i : i + SMALL_BATCH] for i in range(0, len(small), SMALL_BATCH)]
    return tasks + [[f] for f in todo if f.size >= SMALL_FILE]


def _download_task(
    client: paramiko.SFTPClient, task: list[MirroredFile], depth: int = PIPE_DEPTH
) -> None:
    if task[0].size < SMALL_FILE and _download_small_batch(client, task):
        return
    for item in task:
        _download(client, item, depth)


def _mark_lost(items: list[MirroredFile], reason: str) -> None:
    for item in items:
        item.status, item.reason, item.connection_lost = FAILED, reason, True
