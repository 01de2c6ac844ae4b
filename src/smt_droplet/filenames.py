"""Names for uploaded files: what a browser or script sends is never trusted as a path.

The upload server stores a file as ``<UTC yyyymmddTHHMMSS>_<sanitized original>``. A sanitized
name is plain ASCII from ``[A-Za-z0-9._-]``, starts with a letter or digit, contains no ``..``,
no path separator and no control character, is bounded in length, and keeps a lower-case
``.csv`` (or ``.csv.<n>``) extension so the ingest pass's include globs (``*.csv``, ``*.csv.*``)
pick it up. Temporary upload files use a name those globs never match (see :func:`temp_name`).
"""

from __future__ import annotations

import re
import time
import unicodedata
import uuid

MAX_STEM = 100
"""Longest stem (name without extension) kept from the original name."""

TEMP_PREFIX = ".upload-"
TEMP_SUFFIX = ".part"

_CSV_EXT = re.compile(r"\.csv(\.\d{1,6})?\Z", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_EDGE = re.compile(r"\A[._-]+|[._-]+\Z")


def split_csv_extension(name: str) -> tuple[str, str] | None:
    """``("stem", ".csv")`` / ``("stem", ".csv.3")`` for a CSV-like name, else ``None``."""
    base = basename(name)
    match = _CSV_EXT.search(base)
    if match is None:
        return None
    return base[: match.start()], match.group(0).lower()


def basename(name: str) -> str:
    """The part after the last ``/`` or ``\\`` (browsers on Windows send full paths)."""
    return re.split(r"[/\\]", name)[-1]


def is_csv_name(name: str) -> bool:
    """True when the upload's name has a CSV extension the ingest pass will consider."""
    return split_csv_extension(name) is not None


def sanitize_filename(name: str, max_stem: int = MAX_STEM) -> str:
    """A safe, ingest-visible file name derived from an untrusted ``name``.

    Non-ASCII letters are folded to ASCII where Unicode allows (``é`` → ``e``); every other
    character outside ``[A-Za-z0-9._-]`` (spaces, control characters, separators, quotes) becomes
    ``_``; runs of dots collapse; leading/trailing ``. _ -`` are dropped; the stem is cut to
    ``max_stem`` characters. A name without a CSV extension gets ``.csv`` appended, so the result
    always matches ``*.csv`` or ``*.csv.*``.
    """
    split = split_csv_extension(name)
    stem, ext = split if split is not None else (basename(name), ".csv")
    folded = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", folded)
    cleaned = _DOTS.sub(".", cleaned)
    cleaned = re.sub(r"_{2,}", "_", cleaned)
    cleaned = _EDGE.sub("", cleaned[:max_stem])
    cleaned = _EDGE.sub("", cleaned)
    if not cleaned:
        cleaned = "upload"
    return cleaned + ext


def stored_name(original: str, now: float | None = None, max_stem: int = MAX_STEM) -> str:
    """``<UTC yyyymmddTHHMMSS>_<sanitized original>`` for an upload received at ``now``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}_{sanitize_filename(original, max_stem)}"


_UPLOAD_NAME = re.compile(r"\A\d{8}T\d{6}_[^/]+\Z")


def is_upload_name(rel: str) -> bool:
    """Whether an inbox-relative path is one :func:`stored_name` gave (an upload, not SFTP)."""
    return bool(_UPLOAD_NAME.match(rel))


def with_counter(name: str, n: int) -> str:
    """``name`` with ``-<n>`` before its CSV extension (used when the name is taken)."""
    split = split_csv_extension(name)
    stem, ext = split if split is not None else (name, "")
    return f"{stem}-{n}{ext}"


def temp_name() -> str:
    """A dot-file name for an upload in progress; never matches the ingest include globs."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)
