"""What the two Ansible modules in ``library/`` share: their environment, their log and the
one runner that maps the package's errors to ``fail_json``.

The modules are thin: they declare options, call :func:`run_module` with the work to do, and
map results. Nothing here imports Ansible; ``module`` is duck-typed (``params``, ``check_mode``,
``fail_json``, ``no_log_values``), so the package stays importable without it.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .config import ConfigError
from .envfile import EnvFileError, read_env_file
from .ledger import LedgerError
from .lock import LockBusy, PassLock, lock_path_for

T = TypeVar("T")


def module_env(params: Mapping[str, Any], option_env: Mapping[str, str]) -> dict[str, str]:
    """The environment a module runs with: its ``env_file`` (if any), then its explicit options
    (lower-case environment names) on top. The controller's environment is never used."""
    env: dict[str, str] = {}
    if params.get("env_file"):
        env.update(read_env_file(params["env_file"]))
    for option, name in option_env.items():
        value = params.get(option)
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        env[name] = str(value)
    return env


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


JOURNAL_IDENT = "smt-ingest"  # the units' SyslogIdentifier=: `journalctl -t smt-ingest`
SYSLOG_SOCKET = "/dev/log"  # journald listens here; SMT_SYSLOG_SOCKET overrides it (tests)


def journal_handler(ident: str = JOURNAL_IDENT) -> logging.Handler | None:
    """A handler that sends lines to the local journal (through the syslog socket) under
    ``ident``, so a module-run pass sits beside the timer's; ``None`` where there is none."""
    socket_path = os.environ.get("SMT_SYSLOG_SOCKET", SYSLOG_SOCKET)
    if not os.path.exists(socket_path):
        return None
    try:
        handler = logging.handlers.SysLogHandler(
            socket_path, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError:
        return None
    handler.ident = f"{ident}: "
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def captured_log(journal: bool = False) -> Iterator[list[str]]:
    """Collect the package's INFO+ log lines into a list (returned as a module's ``log``);
    ``journal``: also send them to the journal (:func:`journal_handler`)."""
    lines: list[str] = []
    handlers: list[logging.Handler] = [_ListHandler(lines)]
    extra = journal_handler() if journal else None
    if extra is not None:
        handlers.append(extra)
    root = logging.getLogger("smt_droplet")
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield lines
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def trouble(lines: list[str], limit: int = 20) -> list[str]:
    """The warning and error lines of a log (what a failed module result shows: the whole
    log is in the journal)."""
    return [line for line in lines if line.startswith(("WARNING", "ERROR"))][:limit]


def pass_lock(
    state_file: Path | str, wait: float, check_mode: bool
) -> contextlib.AbstractContextManager[Any]:
    """The ingest pass's lock; none in check mode (read-only: not even the lock file)."""
    if check_mode:
        return contextlib.nullcontext()
    return PassLock(lock_path_for(Path(state_file)), wait=wait)


def run_module(
    module: Any,
    option_env: Mapping[str, str],
    work: Callable[[dict[str, str]], T],
    *,
    refused: tuple[type[BaseException], str] | None = None,
) -> tuple[T, list[str]]:
    """Run ``work(env)`` with the module's environment and log (also sent to the journal under
    ``smt-ingest``, except in check mode); every failure the package
    names becomes ``fail_json`` with the log so far: configuration errors (``configuration
    error: ...``), a busy lock or an unwritable ledger, and ``refused`` (an exception type and
    the message prefix, e.g. the SFTP host key)."""
    with captured_log(journal=not module.check_mode) as lines:
        try:
            return work(module_env(module.params, option_env)), lines
        except (ConfigError, EnvFileError, ValueError) as exc:
            module.fail_json(msg=f"configuration error: {exc}", log=trouble(lines))
        except (LockBusy, LedgerError) as exc:
            module.fail_json(msg=str(exc), log=trouble(lines))
        except BaseException as exc:
            if refused is not None and isinstance(exc, refused[0]):
                module.fail_json(msg=f"{refused[1]}: {exc}", log=trouble(lines))
            raise
    raise AssertionError("fail_json returned")  # pragma: no cover - fail_json exits
