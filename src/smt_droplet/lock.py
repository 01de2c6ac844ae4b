"""One ingest pass at a time per box: ``fcntl.flock`` on a lock file beside the ledger.

Rule (chosen and documented here, in ``smt-droplet ingest --help`` and in the modules' docs):
a second pass **waits** for the running one, at most ``SMT_LOCK_WAIT`` seconds (default 300;
``0`` = do not wait). If the lock is still held after that, the second pass logs
``another pass is running (pid N); not starting`` and exits **0** — the running pass does the
work, and requests queued meanwhile stay in the spool, so the ``.path`` unit starts another pass
as soon as the running one ends. The timer, the webhook/upload-triggered service, the Ansible
modules and ``smt-droplet post``/``forget`` all take the same lock, so they never interleave
appends to ``STATE_FILE``.

The lock is an advisory ``flock`` on ``<STATE_FILE>.lock``; the kernel drops it when the holder
dies (SIGKILL included), so a crashed pass never wedges the next one. The holder writes its pid
into the file for the message above.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

DEFAULT_WAIT = 300.0


class LockBusy(RuntimeError):
    """Another pass held the lock for longer than we were willing to wait."""

    def __init__(self, path: Path, holder: str, waited: float) -> None:
        self.path = path
        self.holder = holder
        self.waited = waited
        super().__init__(f"another pass is running (pid {holder}); waited {waited:.0f}s on {path}")


def lock_path_for(state_file: Path) -> Path:
    state_file = Path(state_file)
    return state_file.with_name(state_file.name + ".lock")


class PassLock:
    """Context manager: ``with PassLock(path, wait=30):`` — raises :class:`LockBusy`."""

    def __init__(self, path: Path, wait: float = DEFAULT_WAIT, poll: float = 0.1) -> None:
        self.path = Path(path)
        self.wait = max(0.0, wait)
        self.poll = poll
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
        deadline = time.monotonic() + self.wait
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise LockBusy(self.path, holder, time.monotonic() - start) from None
                time.sleep(self.poll)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> PassLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
    except OSError:
        return "?"
