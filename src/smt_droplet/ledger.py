"""The ledger: which files the web app has accepted, plus per-file state beside it.

Two files, two jobs:

``STATE_FILE`` (default ``<inbox>/.posted_sha256``)
    The old droplets' format, kept byte-compatible: one lowercase hex SHA256 per line. It is the
    only record of "accepted". A digest is appended (``O_APPEND``, one ``write``, then ``fsync``)
    only *after* the web app answered 200 ``ok: true``. So a SIGKILL at any instant can neither
    lose a recorded post (it is on disk before the next file is touched) nor record a file that
    was not accepted (nothing is written before the 200). A kill between the 200 and the append
    means the next pass posts the file again, and the app answers ``duplicate: true`` — harmless.
    Readers ignore blank, CRLF-terminated, upper-case and garbage lines; a writer that finds a
    torn last line (no trailing newline) starts a fresh line first. ``forget`` rewrites the file
    atomically (temp file beside it, fsync, rename, same mode and owner).

``<STATE_FILE>.json`` (the sidecar)
    Advisory, richer state, written atomically with :func:`smt_droplet.durable.write_json_atomic`:
    ``hashes`` — the (relative path, size, mtime_ns) → sha256 cache that keeps an idle pass from
    re-reading every file, plus when the file was first seen in the inbox; ``outcomes`` — per
    sha256 the last outcome that was not a post: those that settle the bytes (``rejected`` with
    the app's error code, ``too-large`` with both sizes, ``not-csv``, and ``ignored``, the
    operator's tombstone) are not tried again until the file changes or an operator runs
    ``forget``; ``no-esiid`` and ``failed-will-retry`` are remembered for ``status`` only.
    Every record also carries the ``esiid``, ``meter`` and the file's data ``summary``
    (:mod:`smt_droplet.csvdata`) when they are known. A PGP delivery (``.asc``) adds
    ``via: "pgp"``, the zip ``member`` that was posted and its ``csv_sha256`` to its record
    (``smt-droplet status`` shows them).
``<STATE_FILE>.posts.jsonl`` (the post log)
    One JSON line per accepted post, appended (``O_APPEND``, one ``write``) right after the
    digest went into ``STATE_FILE``: ``sha256``, the app's ``id``, ``path``, ``duplicate``,
    ``at`` and the keys of an outcome record above; a later line for the same digest wins. It
    grows by ~840 bytes a post and only the readers of post records load it (``status``, the
    operator page's coverage chart, retention): a pass neither reads it nor rewrites it, so its
    memory and its sidecar writes do not grow with years of posts. It is fsynced when the
    sidecar is saved; a torn last line (a crash mid-write) is skipped by readers. ``forget``
    rewrites it atomically without the forgotten digests. A sidecar of an earlier version kept
    these records in its ``posted`` section; the next pass moves them into the log.
``<STATE_FILE>.retired.json``
    Files retention took out of the inbox (:mod:`smt_droplet.retention`): per inbox path
    ``[size, mtime (whole seconds), sha256, when, archive path or null]``, so the next sync does
    not download the same remote file again (the mirror reads only this small file); an entry
    is dropped once SFTP no longer lists its path (remote completion, or SMT's own clean-up).
    Written atomically like the sidecar; losing it costs one download and one skipped
    ``already posted`` per retired file still on SFTP.

    Losing the sidecar costs a re-hash and, at worst, one more rejected POST; never a double
    ledger entry or a lost one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import durable
from .lock import lock_path_for

_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
SIDECAR_SUFFIX = ".json"
POSTS_SUFFIX = ".posts.jsonl"
RETIRED_SUFFIX = ".retired.json"
SIDECAR_VERSION = 1


class LedgerError(OSError):
    """The ledger or its sidecar cannot be read or written; the message names the file."""


def is_digest(value: str) -> bool:
    """True for a 64-character hex SHA256 (either case)."""
    return bool(_DIGEST.match(value.strip().lower()))


def read_posted_digests(state_file: Path) -> set[str]:
    """Every digest recorded in ``state_file`` (lowercase hex); a missing file is an empty set.

    Tolerates CRLF, blank lines, surrounding whitespace, upper-case hex and garbage lines (those
    are skipped), so a hand-edited or torn file still reads.
    """
    try:
        data = Path(state_file).read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {state_file}: {exc.strerror or exc}") from exc
    digests: set[str] = set()
    for raw in data.splitlines():
        line = raw.decode("ascii", "replace").strip().lower()
        if _DIGEST.match(line):
            digests.add(sys.intern(line))  # one string per digest, shared with the hash cache
    return digests


def append_posted(state_file: Path, digest: str) -> None:
    """Durably record one accepted digest: one ``write`` of ``digest\\n``, then ``fsync``."""
    digest = digest.strip().lower()
    if not _DIGEST.match(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    _append_line(Path(state_file), (digest + "\n").encode("ascii"), sync=True, what="ledger")


def _append_line(path: Path, line: bytes, *, sync: bool, what: str) -> None:
    """Append ``line`` (ending in a newline) in one ``write`` (``O_APPEND``), after a newline of
    its own if the file ends in a torn line (killed mid-write), so that line cannot swallow this
    one; ``sync``: fsync before returning."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o660)
    except OSError as exc:
        raise LedgerError(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as reader:
                reader.seek(size - 1)
                if reader.read(1) not in (b"\n", b"\r"):
                    line = b"\n" + line
        os.write(fd, line)
        if sync:
            os.fsync(fd)
    except OSError as exc:
        raise LedgerError(f"cannot append to {what} {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def read_post_records(state_file: Path) -> dict[str, dict[str, Any]]:
    """The post log (module docstring): per digest, the last record appended for it. Torn and
    garbage lines are skipped; a missing log is empty."""
    path = posts_path(state_file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LedgerError(f"cannot read post log {path}: {exc.strerror or exc}") from exc
    records: dict[str, dict[str, Any]] = {}
    for raw in data.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        digest = record.get("sha256") if isinstance(record, dict) else None
        if isinstance(digest, str) and is_digest(digest):
            del record["sha256"]
            records[digest.strip().lower()] = record
    return records


def _post_line(digest: str, record: Mapping[str, Any]) -> bytes:
    return json.dumps({"sha256": digest, **record}, sort_keys=True).encode() + b"\n"


def _rewrite_post_log(state_file: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace the post log with ``records``."""
    data = b"".join(_post_line(d, r) for d, r in records.items())
    _rewrite(posts_path(state_file), data, "post log")


def _rewrite(path: Path, data: bytes, what: str) -> None:
    """Replace ``path`` atomically (temp file, fsync, rename), keeping its mode and owner
    (``forget`` is often run as root on a file the service owns); a new file gets 0660."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise LedgerError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        durable.write_atomic(
            path,
            data,
            mode=st.st_mode & 0o7777 if st else 0o660,
            owner=(st.st_uid, st.st_gid) if st else None,
        )
    except OSError as exc:
        raise LedgerError(f"cannot rewrite {what} {path}: {exc.strerror or exc}") from exc


def remove_digests(state_file: Path, digests: set[str]) -> int:
    """Atomically rewrite ``state_file`` without ``digests``; returns how many lines went.

    The caller holds the pass lock, so no append can slip in between read and rename. Mode and
    owner of the old file are kept (``forget`` is often run as root on a file the service owns).
    """
    state_file = Path(state_file)
    drop = {d.lower() for d in digests}
    try:
        lines = state_file.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {state_file}: {exc.strerror or exc}") from exc
    kept: list[bytes] = []
    removed = 0
    for raw in lines:
        line = raw.decode("ascii", "replace").strip().lower()
        if line in drop:
            removed += 1
            continue
        if _DIGEST.match(line):
            kept.append(line.encode("ascii"))
    if removed == 0:
        return 0
    _rewrite(state_file, b"".join(line + b"\n" for line in kept), "ledger")
    return removed


@dataclass
class Outcome:
    """A non-retryable outcome remembered for one sha256 (``rejected`` or ``too-large``)."""

    status: str
    reason: str
    path: str
    at: float


@dataclass
class Ledger:
    """The ledger file plus its sidecar, loaded once per pass.

    ``posted`` mirrors ``STATE_FILE``; ``record_posted`` appends to the file first and only then
    updates memory. The sidecar is saved by :meth:`save` (end of a pass, and at most every
    ``save_interval`` seconds during one). The post records (:attr:`apps`) are read from the
    post log the first time something asks for them, never by a pass that only posts.
    """

    state_file: Path
    posted: set[str] = field(default_factory=set)
    hashes: dict[str, list[Any]] = field(default_factory=dict)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    retired: dict[str, list[Any]] = field(default_factory=dict)
    save_interval: float = 5.0
    _apps: dict[str, dict[str, Any]] | None = None  # the post log, once read
    _legacy_apps: dict[str, dict[str, Any]] = field(default_factory=dict)  # old sidecar's
    _log_unsynced: bool = False
    _unlogged: dict[str, dict[str, Any]] = field(default_factory=dict)  # appends that failed
    _dirty: bool = False
    _retired_dirty: bool = False
    _last_save: float = 0.0

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.state_file)

    @property
    def posts_log(self) -> Path:
        return posts_path(self.state_file)

    @property
    def own_files(self) -> list[Path]:
        """The ledger's files, which an inbox scan must never take for deliveries: STATE_FILE,
        the sidecar, the post log and the pass lock."""
        return [self.state_file, self.sidecar, self.posts_log, lock_path_for(self.state_file)]

    @property
    def apps(self) -> dict[str, dict[str, Any]]:
        """Per posted digest, its post record (the app's ``id``, ``at``, ``esiid``, summary):
        an old sidecar's records, overridden by the post log's."""
        if self._apps is None:
            self._apps = {**self._legacy_apps, **read_post_records(self.state_file)}
        return self._apps

    @classmethod
    def load(cls, state_file: Path) -> Ledger:
        ledger = cls(state_file=Path(state_file))
        ledger.posted = read_posted_digests(ledger.state_file)
        raw = _read_sidecar(ledger.sidecar)
        ledger.hashes = {
            k: _shared_digest(v)
            for k, v in _section(raw, "hashes").items()
            if isinstance(v, list) and len(v) in (3, 4) and isinstance(v[2], str)
        }
        ledger.outcomes = {
            k: v for k, v in _section(raw, "outcomes").items() if isinstance(v, dict)
        }
        ledger._legacy_apps = {
            k: v for k, v in _section(raw, "posted").items() if isinstance(v, dict)
        }
        ledger.retired = read_retired(ledger.state_file)
        ledger._last_save = time.monotonic()
        return ledger

    # -- the hash cache -------------------------------------------------------------------
    def cached_digest(self, rel: str, size: int, mtime_ns: int) -> str | None:
        entry = self.hashes.get(rel)
        if entry and entry[0] == size and entry[1] == mtime_ns:
            return str(entry[2])
        return None

    def remember_digest(self, rel: str, size: int, mtime_ns: int, digest: str) -> None:
        entry = self.hashes.get(rel)
        if entry is None or entry[:3] != [size, mtime_ns, digest]:
            seen = entry[3] if entry is not None and len(entry) == 4 else round(time.time(), 3)
            self.hashes[rel] = [size, mtime_ns, digest, seen]
            self._dirty = True

    def first_seen(self, rel: str) -> float | None:
        """When a pass (or ``status``) first saw ``rel`` in the inbox (``None``: before this
        was recorded)."""
        entry = self.hashes.get(rel)
        return float(entry[3]) if entry is not None and len(entry) == 4 else None

    def path_of(self, digest: str) -> str | None:
        """The inbox path whose cached digest is ``digest`` (the first one, if copies)."""
        return next((rel for rel, entry in self.hashes.items() if entry[2] == digest), None)

    def needing_operator(self, statuses: frozenset[str]) -> set[str]:
        """Digests of inbox files (the hash cache) whose recorded outcome is in ``statuses``."""
        inbox = {str(e[2]) for e in self.hashes.values()}
        return {
            d
            for d in inbox
            if d not in self.posted and (self.outcomes.get(d) or {}).get("status") in statuses
        }

    def known_digests(self) -> set[str]:
        """Every digest the ledger knows: posted, with an outcome, or in the inbox."""
        return self.posted | set(self.outcomes) | {str(e[2]) for e in self.hashes.values()}

    def invalidate_digest(self, rel: str) -> None:
        """Forget the cached digest of ``rel`` (its content changed under the same size and
        mtime): the next pass hashes it again. Saved like any other cache change."""
        if self.hashes.pop(rel, None) is not None:
            self._dirty = True

    def prune_hashes(self, present: set[str]) -> None:
        """Drop cache entries for files no longer in the inbox."""
        gone = [rel for rel in self.hashes if rel not in present]
        for rel in gone:
            del self.hashes[rel]
        self._dirty = self._dirty or bool(gone)

    # -- retired files (retention) -------------------------------------------------------------
    def retire(self, rel: str, size: int, mtime: int, digest: str, archive: str | None) -> None:
        """``rel`` left the inbox (posted as ``digest``); ``archive``: where its copy is."""
        self.retired[rel] = [size, mtime, digest, round(time.time(), 3), archive]
        self._retired_dirty = True

    def retired_digest(self, rel: str, size: int, mtime: int) -> str | None:
        """The digest of a retired file when the remote one is still the same (size, mtime)."""
        entry = self.retired.get(rel)
        if entry and entry[0] == size and entry[1] == mtime:
            return str(entry[2])
        return None

    def prune_retired(self, listed: set[str]) -> int:
        """Forget retired paths SFTP no longer lists (a complete listing only)."""
        gone = [rel for rel in self.retired if rel not in listed]
        for rel in gone:
            del self.retired[rel]
        self._retired_dirty = self._retired_dirty or bool(gone)
        return len(gone)

    # -- outcomes ---------------------------------------------------------------------------
    def is_posted(self, digest: str) -> bool:
        return digest in self.posted

    def record_posted(
        self,
        digest: str,
        rel: str,
        app_id: str | None,
        duplicate: bool,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Append to ``STATE_FILE`` (durable), then note the app's id in the sidecar.

        ``extra`` goes into the sidecar record too (a PGP delivery: ``via``, ``member``,
        ``csv_sha256``); it never replaces the keys above.
        """
        if digest not in self.posted:  # a re-send on purpose: STATE_FILE keeps one line
            append_posted(self.state_file, digest)
            self.posted.add(digest)
        if self.outcomes.pop(digest, None) is not None:
            self._dirty = True
        record = dict(extra or {})
        record.update({"id": app_id, "path": rel, "duplicate": duplicate, "at": time.time()})
        try:
            _append_line(self.posts_log, _post_line(digest, record), sync=False, what="post log")
            self._log_unsynced = True
        except LedgerError:  # the post is recorded (STATE_FILE); save() tries again, and says so
            self._unlogged[digest] = record
        if self._apps is not None:
            self._apps[digest] = record

    def record_outcome(
        self,
        digest: str,
        status: str,
        reason: str,
        rel: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Remember a non-posted outcome for ``digest`` (``extra`` as in :meth:`record_posted`)."""
        record = dict(extra or {})
        record.update({"status": status, "reason": reason, "path": rel, "at": time.time()})
        self.outcomes[digest] = record
        self._dirty = True

    def outcome(self, digest: str) -> Outcome | None:
        raw = self.outcomes.get(digest)
        if not raw:
            return None
        return Outcome(
            status=str(raw.get("status", "")),
            reason=str(raw.get("reason", "")),
            path=str(raw.get("path", "")),
            at=float(raw.get("at", 0.0)),
        )

    def forget(self, digests: set[str]) -> int:
        """Drop digests from the ledger (atomic rewrite) and their sidecar state."""
        removed = remove_digests(self.state_file, digests)
        logged = read_post_records(self.state_file)
        if any(d in logged for d in digests):
            _rewrite_post_log(
                self.state_file, {d: r for d, r in logged.items() if d not in digests}
            )
            self._log_unsynced = False
        for digest in digests:
            self.posted.discard(digest)
            self.outcomes.pop(digest, None)
            self._legacy_apps.pop(digest, None)
            self._unlogged.pop(digest, None)
            if self._apps is not None:
                self._apps.pop(digest, None)
        self._dirty = True
        return removed

    # -- persistence --------------------------------------------------------------------------
    def maybe_save(self) -> None:
        if (
            self._dirty or self._unlogged
        ) and time.monotonic() - self._last_save >= self.save_interval:
            self.save()

    def save(self, *, move_post_records: bool = False) -> None:
        """Write what changed: the retired files, the sidecar, and the post log's appends to
        disk. ``move_post_records`` (a pass, under the pass lock): an old sidecar's post records
        go into the post log first, and the sidecar is written without them. The post log is
        flushed even when the sidecar cannot be written; the first failure is raised."""
        if move_post_records and self._legacy_apps:
            logged = read_post_records(self.state_file)
            _rewrite_post_log(self.state_file, {**self._legacy_apps, **logged})
            self._legacy_apps = {}
            self._dirty = True
        self._last_save = time.monotonic()
        try:
            self._save_state()
        except LedgerError:
            with contextlib.suppress(LedgerError):
                self._flush_post_log()
            raise
        self._flush_post_log()

    def _flush_post_log(self) -> None:
        """Append the records whose append failed (a full disk), then fsync the log."""
        for digest, record in list(self._unlogged.items()):
            _append_line(self.posts_log, _post_line(digest, record), sync=False, what="post log")
            del self._unlogged[digest]
            self._log_unsynced = True
        if self._log_unsynced:
            _fsync_path(self.posts_log, "post log")
            self._log_unsynced = False

    def _save_state(self) -> None:
        if self._retired_dirty:
            path = retired_path(self.state_file)
            try:
                durable.write_json_atomic(path, {"version": 1, "retired": self.retired})
            except OSError as exc:
                raise LedgerError(f"cannot write {path}: {exc.strerror or exc}") from exc
            self._retired_dirty = False
        if not self._dirty:
            return
        payload: dict[str, Any] = {
            "version": SIDECAR_VERSION,
            "hashes": self.hashes,
            "outcomes": self.outcomes,
        }
        if self._legacy_apps:  # not moved yet (a reader's save): kept as it was
            payload["posted"] = self._legacy_apps
        try:
            durable.write_json_atomic(self.sidecar, payload)
        except OSError as exc:
            raise LedgerError(f"cannot write {self.sidecar}: {exc.strerror or exc}") from exc
        self._dirty = False
        self._last_save = time.monotonic()


def sidecar_path(state_file: Path) -> Path:
    state_file = Path(state_file)
    return state_file.with_name(state_file.name + SIDECAR_SUFFIX)


def posts_path(state_file: Path) -> Path:
    state_file = Path(state_file)
    return state_file.with_name(state_file.name + POSTS_SUFFIX)


def _fsync_path(path: Path, what: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LedgerError(f"cannot flush {what} {path}: {exc.strerror or exc}") from exc


def retired_path(state_file: Path) -> Path:
    state_file = Path(state_file)
    return state_file.with_name(state_file.name + RETIRED_SUFFIX)


def read_retired(state_file: Path) -> dict[str, list[Any]]:
    """The retired files (see the module docstring); missing or corrupt: none."""
    raw = _read_sidecar(retired_path(state_file))
    return {
        k: v
        for k, v in _section(raw, "retired").items()
        if isinstance(v, list) and len(v) == 5 and isinstance(v[2], str)
    }


def _shared_digest(entry: list[Any]) -> list[Any]:
    """A hash-cache entry whose digest is the ledger's own string (``sys.intern``): an inbox of
    100,000 posted files then holds each digest once, not twice."""
    entry[2] = sys.intern(entry[2])
    return entry


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # Advisory state only: a corrupt sidecar means re-hashing, not failing the pass.
        return {}
    return raw if isinstance(raw, dict) else {}
