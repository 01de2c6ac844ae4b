"""The one rule for what an ESIID and a meter id are, wherever they come from.

* An **ESIID** is exactly 17 ASCII digits. SMT writes it with a leading apostrophe in CSVs
  (``'10443720000000099``), so one apostrophe or double quote on each side and surrounding
  white space are tolerated. Digits of other scripts (full-width, Arabic-Indic) do not count.
* A **meter** id is 1-32 characters of ``A-Z a-z 0-9 . _ -`` (``M1``).
* In a file **name**, an ESIID is ``10`` followed by 15 digits, not part of a longer digit run;
  a meter is an ``M<digits>`` token (``..._M2_...``).

:func:`normalize_esiid` is the lenient reading (a CSV cell, a default: ``None`` if it is not an
ESIID); :func:`parse_esiid` / :func:`parse_meter` check a field a caller sent (webhook body,
upload form, ``post --esiid``) and raise :class:`FieldError` naming the field.
"""

from __future__ import annotations

import re
from typing import Any

_ESIID = re.compile(r"[0-9]{17}\Z")
_METER = re.compile(r"[A-Za-z0-9._-]{1,32}\Z")
_ESIID_IN_NAME = re.compile(r"(?<![0-9])(10[0-9]{15})(?![0-9])")
_METER_IN_NAME = re.compile(r"(?<![A-Za-z0-9])([Mm][0-9]{1,4})(?![A-Za-z0-9])")


class FieldError(ValueError):
    """A field a caller sent is not acceptable; ``code`` goes into the 400 response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def normalize_esiid(value: str | None) -> str | None:
    """The 17 digits of ``value`` (quotes and white space stripped), or ``None``."""
    if value is None:
        return None
    v = value.strip()
    if v[:1] in ("'", '"'):
        v = v[1:]
    if v[-1:] in ("'", '"'):
        v = v[:-1]
    v = v.strip()
    return v if _ESIID.match(v) else None


def parse_esiid(value: Any) -> str | None:
    """``None`` for a blank field, the ESIID of a string or integer field, or raise."""
    if _blank(value):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FieldError("bad_esiid", "esiid must be a 17-digit string")
    esiid = normalize_esiid(str(value))
    if esiid is None:
        raise FieldError("bad_esiid", "esiid must be exactly 17 digits")
    return esiid


def parse_meter(value: Any) -> str | None:
    """``None`` for a blank field, a short meter id (``M1``), or raise."""
    if _blank(value):
        return None
    if not isinstance(value, str) or not _METER.match(value.strip()):
        raise FieldError("bad_meter", "meter must be 1-32 characters of A-Z a-z 0-9 . _ -")
    return value.strip()


def esiid_from_name(name: str) -> str | None:
    match = _ESIID_IN_NAME.search(name)
    return match.group(1) if match else None


def meter_from_name(name: str) -> str | None:
    match = _METER_IN_NAME.search(name)
    return match.group(1).upper() if match else None
