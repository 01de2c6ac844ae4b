"""What the web app does with the CSVs it is sent on its large-file path, as the double plays it.

The double's ``POST /api/admin/smt/raw-upload`` (see ``intelliwatt_double.py``) hands each
accepted body to :class:`IntervalStore`, which behaves like the app's parser and interval table
as ``docs/intelliwatt-contract.md`` (part 2) records them:

* a row's instant is its local start (America/Chicago); with ``dst_overwrite`` (the app's
  measured behaviour) always taken with ``fold=0``, so the repeated 01:00-01:45 hour of a
  fall-back day lands on the first one and overwrites it, and one UTC hour stays empty — the
  app's count then says 4 fewer; without it (the default) the second occurrence is placed
  right;
* rows are stored per (ESIID, instant) and a later upload of the same instant replaces the
  value (a repeated part is parsed again and replaces its rows);
* content that is not a CSV the parser knows (gzip bytes, another layout) yields 0 intervals
  and a ``normalizedInline`` with ``records: 0``;
* switchable failure modes: ``dst_overwrite``, ``window_days`` (intervals older than that are
  not kept; when none is left the answer is ``normalizedInline: null``) and ``drop_intervals``
  (the next N intervals the parser finds are lost, the latest of each upload first).

Raw uploads are kept per sha256 (the app's ``RawSmtFile``): :meth:`IntervalStore.assembled`
puts the parts of each file (``<name>.partN-of-M``) back together, so a test can compare the
bytes with what the droplet holds.

Stdlib only: this file is copied into containers next to the double.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

CHICAGO = ZoneInfo("America/Chicago")
PART_RE = re.compile(r"^(?P<base>.+)\.part(?P<index>\d+)-of-(?P<total>\d+)$")
SMT_COLUMNS = ("ESIID", "USAGE_DATE", "USAGE_START_TIME", "USAGE_KWH")
APP_COLUMNS = ("ESIID", "METER", "START DATE/TIME", "USAGE (KWH)")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Parsed:
    intervals: dict[tuple[str, datetime], float] = field(default_factory=dict)
    total_rows: int = 0
    processed_rows: int = 0
    invalid_esiid: int = 0
    invalid_timestamp: int = 0
    invalid_kwh: int = 0
    total_kwh: float = 0.0

    def diagnostics(self) -> dict[str, Any]:
        stamps = [ts for _, ts in self.intervals]
        return {
            "totalRows": self.total_rows,
            "processedRows": self.processed_rows,
            "invalidEsiid": self.invalid_esiid,
            "invalidTimestamp": self.invalid_timestamp,
            "invalidKwh": self.invalid_kwh,
            "totalKwh": round(self.total_kwh, 6),
            "tsMin": _iso(min(stamps)) if stamps else None,
            "tsMax": _iso(max(stamps)) if stamps else None,
        }


def parse(content: bytes, esiid: str | None, dst_overwrite: bool = False) -> Parsed:
    """The app's reading of one upload's text (see the module docstring)."""
    out = Parsed()
    seen: set[tuple[str, datetime]] = set()
    text = content.decode("utf-8", "replace").lstrip("\ufeff")
    rows = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().strip("'\"").upper() for h in next(rows)]
    except (StopIteration, csv.Error):
        return out
    if all(c in header for c in SMT_COLUMNS):
        cols = [header.index(c) for c in SMT_COLUMNS]
        layout = "smt"
    elif all(c in header for c in APP_COLUMNS):
        cols = [header.index(c) for c in APP_COLUMNS[:1] + APP_COLUMNS[2:]]
        layout = "app"
    else:
        return out
    try:
        for row in rows:
            if not row:
                continue
            out.total_rows += 1
            _row(out, row, cols, layout, esiid, None if dst_overwrite else seen)
    except csv.Error:
        pass
    return out


def _row(
    out: Parsed,
    row: list[str],
    cols: list[int],
    layout: str,
    esiid: str | None,
    seen: set[tuple[str, datetime]] | None,
) -> None:
    try:
        who = row[cols[0]].strip().strip("'") or (esiid or "")
        if layout == "smt":
            month, day, year = (int(p) for p in row[cols[1]].strip().split("/"))
            hour, minute = (int(p) for p in row[cols[2]].strip().split(":"))
            local = datetime(year, month, day) + timedelta(hours=hour, minutes=minute)
            raw_kwh = row[cols[3]].strip()
        else:
            local = datetime.fromisoformat(row[cols[1]].strip()).replace(tzinfo=None)
            raw_kwh = row[cols[2]].strip()
    except (ValueError, IndexError):
        out.invalid_timestamp += 1
        return
    if not re.fullmatch(r"\d{17}", who):
        out.invalid_esiid += 1
        return
    try:
        kwh = float(raw_kwh)
    except ValueError:
        out.invalid_kwh += 1
        return
    fold = 0
    if seen is not None:  # a local time met again in one upload: the repeated (CST) hour
        fold = int((who, local) in seen)
        seen.add((who, local))
    instant = local.replace(tzinfo=CHICAGO, fold=fold).astimezone(UTC)
    out.processed_rows += 1
    out.total_kwh += kwh
    out.intervals[(who, instant)] = kwh  # a repeated instant overwrites the first


class IntervalStore:
    """The app's raw-file rows and interval table (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.window_days: float | None = None
        self.drop_intervals = 0
        self.dst_overwrite = False
        self.now: datetime | None = None  # None: the wall clock (tests may pin it)
        self.raw: dict[str, dict[str, Any]] = {}  # sha256 → the first upload with it
        self.intervals: dict[tuple[str, datetime], float] = {}
        self.parsed_uploads = 0

    def reset(self) -> None:
        with self._lock:
            self.window_days, self.drop_intervals, self.now = None, 0, None
            self.dst_overwrite = False
            self.raw.clear()
            self.intervals.clear()
            self.parsed_uploads = 0

    def configure(self, settings: dict[str, Any]) -> None:
        with self._lock:
            if "window_days" in settings:
                days = settings["window_days"]
                self.window_days = None if days is None else float(days)
            if "dst_overwrite" in settings:
                self.dst_overwrite = bool(settings["dst_overwrite"])
            if "drop_intervals" in settings:
                self.drop_intervals = max(0, int(settings["drop_intervals"]))

    def accept(self, record: dict[str, Any], content: bytes) -> tuple[bool, dict[str, Any] | None]:
        """Store one upload: ``(duplicate, normalizedInline)``."""
        parsed = parse(content, record.get("esiid"), self.dst_overwrite)
        with self._lock:
            duplicate = record["sha256"] in self.raw
            if not duplicate:
                self.raw[record["sha256"]] = {**record, "content": content}
            self.parsed_uploads += 1
            return duplicate, self._normalize(parsed)

    def _normalize(self, parsed: Parsed) -> dict[str, Any] | None:
        diagnostics = parsed.diagnostics()
        if not parsed.intervals:
            return {
                "intervalsInserted": 0,
                "inserted": 0,
                "skipped": 0,
                "records": 0,
                "tsMin": diagnostics["tsMin"],
                "tsMax": diagnostics["tsMax"],
                "diagnostics": diagnostics,
            }
        kept = dict(parsed.intervals)
        if self.window_days is not None:
            now = self.now or datetime.now(UTC)
            oldest = now - timedelta(days=self.window_days)
            kept = {k: v for k, v in kept.items() if k[1] >= oldest}
        if self.drop_intervals and kept:
            for key in sorted(kept, key=lambda k: k[1], reverse=True)[: self.drop_intervals]:
                del kept[key]
                self.drop_intervals -= 1
        if not kept:
            return None
        self.intervals.update(kept)
        return {
            "intervalsInserted": len(kept),
            "inserted": len(kept),
            "skipped": 0,
            "records": len(kept),
            "tsMin": diagnostics["tsMin"],
            "tsMax": diagnostics["tsMax"],
            "diagnostics": diagnostics,
        }

    def assembled(self) -> dict[str, dict[str, Any]]:
        """Per file name: ``{"content": bytes or None (a part missing), "parts": n,
        "copies": max uploads of one part}`` from the raw uploads."""
        with self._lock:
            uploads = list(self.raw.values())
        groups: dict[str, dict[int, list[bytes]]] = {}
        totals: dict[str, int] = {}
        for up in uploads:
            match = PART_RE.match(up["filename"])
            base, index, total = (
                (match["base"], int(match["index"]), int(match["total"]))
                if match
                else (up["filename"], 1, 1)
            )
            groups.setdefault(base, {}).setdefault(index, []).append(up["content"])
            totals[base] = total
        files = {}
        for base, parts in groups.items():
            total = totals[base]
            whole = None
            if sorted(parts) == list(range(1, total + 1)):
                first = parts[1][0]
                header = first[: first.index(b"\n") + 1] if b"\n" in first else first
                rest = [parts[i][0][len(header) :] for i in range(2, total + 1)]
                whole = first + b"".join(rest)
            copies = max(len(v) for v in parts.values())
            files[base] = {"content": whole, "parts": total, "copies": copies}
        return files

    def stored(self, esiid: str | None = None) -> dict[str, float]:
        """The interval table: UTC ISO instant → kWh (one ESIID, or all)."""
        with self._lock:
            return {_iso(ts): v for (e, ts), v in self.intervals.items() if esiid in (None, e)}
