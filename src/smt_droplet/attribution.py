"""Which ESIID and meter a file belongs to.

ESIID, first match wins:

1. the file name: 17 digits, ``10`` followed by 15 digits, not part of a longer digit run
   (the old droplet looked for 18 digits and never matched a real ESIID);
2. the CSV's ``ESIID`` column (SMT writes ``'10443720000000099``);
3. the per-file default (a spool request naming this file), then the run default (a spool
   request's ``esiid``), then ``ESIID_DEFAULT``.

Meter: an ``M<digits>`` token in the file name (``..._M2_...``), else the defaults in the same
order, else ``METER_DEFAULT`` (``M1``).

No ESIID → :attr:`Attribution.esiid` is ``None``; the caller does not post the file, logs
``no-esiid FILE`` and tries again on the next pass.

What counts as an ESIID or a meter is :mod:`smt_droplet.esiid`'s rule.

Only the first 64 KiB of a file are read, and only for names that look like CSV (never for
PGP-armored ``.asc``/zip payloads).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .esiid import esiid_from_name, meter_from_name, normalize_esiid

HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Attribution:
    """The result: ``esiid`` is ``None`` when no rule found one."""

    esiid: str | None
    meter: str
    esiid_source: str  # "name" | "content" | "default" | "none"
    meter_source: str  # "name" | "default"


def esiid_from_content(head: bytes) -> str | None:
    """The first data row's ``ESIID`` column (header match is case-insensitive)."""
    text = head.decode("utf-8-sig", "replace")
    lines = text.splitlines()
    if len(lines) > 1 and not text.endswith(("\n", "\r")):
        lines = lines[:-1]  # the last line may be cut at HEAD_BYTES
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return None
    names = [h.strip().strip("'\"").upper() for h in header]
    if "ESIID" not in names:
        return None
    column = names.index("ESIID")
    try:
        for row in reader:
            if len(row) > column:
                found = normalize_esiid(row[column])
                if found:
                    return found
    except csv.Error:
        return None
    return None


def _looks_like_csv(name: str) -> bool:
    lower = name.lower()
    return not lower.endswith((".asc", ".zip", ".gpg", ".pgp", ".gz"))


def attribute(
    path: Path,
    defaults: list[tuple[str | None, str | None]],
    head: bytes | None = None,
) -> Attribution:
    """Attribute ``path``. ``defaults`` is ``[(esiid, meter), ...]`` in falling priority
    (per-file request, run request, environment); ``None`` entries are skipped.

    ``head`` is the file's first bytes if the caller has them (saves a read).
    """
    name = path.name
    esiid = esiid_from_name(name)
    esiid_source = "name" if esiid else "none"
    if esiid is None and _looks_like_csv(name):
        if head is None:
            try:
                with open(path, "rb") as handle:
                    head = handle.read(HEAD_BYTES)
            except OSError:
                head = b""
        esiid = esiid_from_content(head[:HEAD_BYTES])
        esiid_source = "content" if esiid else "none"
    if esiid is None:
        for candidate, _ in defaults:
            found = normalize_esiid(candidate)
            if found:
                esiid, esiid_source = found, "default"
                break
    meter = meter_from_name(name)
    meter_source = "name" if meter else "default"
    if meter is None:
        meter = next((m for _, m in defaults if m), "M1")
    return Attribution(esiid, meter, esiid_source, meter_source)
