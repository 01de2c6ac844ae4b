"""Read the droplet's environment file the way systemd's ``EnvironmentFile=`` does.

Rules (systemd.exec(5)): one ``KEY=value`` per line; blank lines and lines starting with ``#`` or
``;`` are ignored; leading whitespace and whitespace around the key are dropped; a value may be
wrapped in single quotes (taken literally) or double quotes (``\\"``, ``\\\\``, ``\\$`` and
``\\``` escapes); a trailing backslash joins the next line. No shell runs, nothing is expanded.
CRLF line endings are tolerated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# The settings that hold secrets: the only ones read from systemd credentials, and the ones no
# log line may contain (logsafety.py).
SECRET_SETTINGS = (
    "ADMIN_TOKEN",
    "INTELLIWATT_WEBHOOK_SECRET",
    "DROPLET_WEBHOOK_SECRET",
    "INTELLIWATT_WEBHOOK_SECRET_PREVIOUS",
    "SMT_UPLOAD_TOKEN",
    "SMT_UPLOAD_TICKET_SECRET",
    "SMT_UPLOAD_TICKET_SECRET_PREVIOUS",
)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LEADING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """The environment file cannot be read or has a line that is not ``KEY=value``."""


def parse_env_text(
    text: str, source: str = "<env>", *, shell_export: bool = False
) -> dict[str, str]:
    """Parse the text of an environment file into a dict (later keys win).

    ``shell_export``: also take ``export KEY=value`` lines (a hand-written file the seed's
    shell script sourced; only the takeover reads those)."""
    result: dict[str, str] = {}
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i]
        i += 1
        # A trailing backslash continues the line (outside single quotes, as systemd does).
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + lines[i]
            i += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if shell_export and stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise EnvFileError(
                f"{source}:{lineno}: expected KEY=value {_what_it_starts_with(stripped)}"
            )
        result[key] = _unquote(value.strip(), f"{source}:{lineno}")
    return result


def _what_it_starts_with(line: str) -> str:
    """Names the variable a malformed line seems to set, never its value (it may be a secret)."""
    name = _LEADING_NAME.match(line)
    if name and _KEY.match(name.group(0)):
        return f"(the line for {name.group(0)} has no '=' right after the name)"
    return "(the line does not start with a variable name)"


def _unquote(value: str, where: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out: list[str] = []
        body = value[1:-1]
        j = 0
        while j < len(body):
            ch = body[j]
            if ch == "\\" and j + 1 < len(body) and body[j + 1] in '"\\$`':
                out.append(body[j + 1])
                j += 2
                continue
            out.append(ch)
            j += 1
        return "".join(out)
    if value[:1] in "'\"":
        raise EnvFileError(f"{where}: unterminated quote")
    return value


def read_env_file(path: str | os.PathLike[str], *, shell_export: bool = False) -> dict[str, str]:
    """Read and parse an environment file; errors name the file and the cause."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise EnvFileError(
            f"cannot read environment file {os.fspath(path)}: {exc.strerror}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise EnvFileError(
            f"environment file {os.fspath(path)} is not UTF-8 text (byte {exc.start})"
        ) from None
    return parse_env_text(text, os.fspath(path), shell_export=shell_export)


def read_credentials(directory: str | os.PathLike[str] | None) -> dict[str, str]:
    """Secrets systemd passed as credentials (``LoadCredential=NAME:...``): one file per setting
    in ``$CREDENTIALS_DIRECTORY``, named like the setting, holding its value. Only the secret
    settings (:data:`SECRET_SETTINGS`) are read; a trailing line end is dropped."""
    if not directory:
        return {}
    found: dict[str, str] = {}
    for name in SECRET_SETTINGS:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as handle:
                found[name] = handle.read().rstrip("\r\n")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvFileError(f"cannot read credential {name} in {directory}: {exc}") from None
    return found


def load_environment(
    env_file: str | os.PathLike[str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The settings a command runs with: the process environment, then the env file on top,
    then the systemd credentials (secrets kept out of the environment) on top of both.

    The file wins over the environment, as with systemd, where ``EnvironmentFile=`` overrides
    ``Environment=``; a box without credentials (the seed's env file with its secrets) works as
    before.
    """
    merged = dict(os.environ if base is None else base)
    if env_file is not None:
        merged.update(read_env_file(env_file))
    merged.update(read_credentials(merged.get("CREDENTIALS_DIRECTORY")))
    return merged
