"""What the two Ansible modules in ``library/`` share: their environment, their log and the
one runner that maps the package's errors to ``fail_json``.

The modules are thin: they declare options, call :func:`run_module` with the work to do, and
map results. Nothing here imports Ansible; ``module`` is duck-typed (``params``, ``check_mode``,
``fail_json``, ``no_log_values``), so the package stays importable without it.
"""

from __future__ import annotations

import contextlib
import logging
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


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect the package's INFO+ log lines into a list (returned as a module's ``log``)."""
    lines: list[str] = []
    handler = _ListHandler(lines)
    root = logging.getLogger("smt_droplet")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


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
    """Run ``work(env)`` with the module's environment and log; every failure the package
    names becomes ``fail_json`` with the log so far: configuration errors (``configuration
    error: ...``), a busy lock or an unwritable ledger, and ``refused`` (an exception type and
    the message prefix, e.g. the SFTP host key)."""
    with captured_log() as lines:
        try:
            return work(module_env(module.params, option_env)), lines
        except (ConfigError, EnvFileError, ValueError) as exc:
            module.fail_json(msg=f"configuration error: {exc}", log=lines)
        except (LockBusy, LedgerError) as exc:
            module.fail_json(msg=str(exc), log=lines)
        except BaseException as exc:
            if refused is not None and isinstance(exc, refused[0]):
                module.fail_json(msg=f"{refused[1]}: {exc}", log=lines)
            raise
    raise AssertionError("fail_json returned")  # pragma: no cover - fail_json exits
