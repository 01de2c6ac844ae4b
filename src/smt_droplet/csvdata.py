"""What is in a file before it is posted: "is this a CSV at all?" and a data summary.

:func:`looks_like_csv` sniffs the first bytes (the upload server refuses on it; a pass marks a
file that fails it ``not-csv``: an empty file, a zip, an HTML error page saved as ``.csv``).

:func:`summarize` reads an interval CSV once, row by row, and returns a :class:`DataSummary`:
the ESIIDs found, the first and last interval, intervals present against intervals expected,
the days with gaps, the share of estimated reads and the kWh total. Two layouts are known:

``smt-interval`` — SMT's export, header ``ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,
    USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION``. ``USAGE_DATE`` is
    the day (``M/D/YYYY``), an interval is present when ``USAGE_KWH`` holds a number (the
    spring-forward hour comes as four rows with empty kWh), ``ESTIMATED_ACTUAL`` is ``A``/``E``.
``intelliwatt`` — the app's simplified files, header ``ESIID,Meter,Start Date/Time,Usage (kWh)``
    with ISO start times written as consecutive 15-minute steps from the first day's local
    midnight (so the fall-back day runs to ``00:45`` of the next date).

A day in America/Chicago has 96 quarter hours, 92 on the spring-forward day and 100 on the
fall-back day (from the tz database, :mod:`zoneinfo`). Any other CSV is ``layout: unknown``: it
is still posted (the app's parser is more lenient), the summary only counts rows.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .esiid import normalize_esiid

SNIFF_BYTES = 8192
TIMEZONE = ZoneInfo("America/Chicago")
INTERVAL = timedelta(minutes=15)
SMT_HEADER = (
    "ESIID",
    "USAGE_DATE",
    "REVISION_DATE",
    "USAGE_START_TIME",
    "USAGE_END_TIME",
    "USAGE_KWH",
    "ESTIMATED_ACTUAL",
    "CONSUMPTION_SURPLUSGENERATION",
)
APP_HEADER = ("ESIID", "METER", "START DATE/TIME", "USAGE (KWH)")
MAX_GAP_DAYS = 400  # gap days kept in a summary (a year and a bit); the count is always exact


def looks_like_csv(head: bytes, at_eof: bool) -> tuple[bool, str]:
    """Sniff the start of a file: ``(ok, reason)``.

    The first line must be UTF-8 text without NULs or control characters, contain a comma, and
    end within the first 8 KiB (unless the file is shorter). Zip, gzip, PGP and HTML fail.
    """
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if not head.strip():
        return False, "the file is empty"
    if b"\x00" in head:
        return False, "the file is binary, not a CSV"
    newline = head.find(b"\n")
    if newline < 0 and not at_eof:
        return False, f"the first line is longer than {SNIFF_BYTES} bytes"
    line = head if newline < 0 else head[:newline]
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return False, "the first line is not UTF-8 text"
    if any(not ch.isprintable() and ch != "\t" for ch in text):
        return False, "the first line contains control characters"
    if text.lstrip().startswith("<"):
        return False, "the file is HTML or XML markup, not a CSV"
    if "," not in text:
        return False, "the first line has no comma-separated columns"
    return True, ""


def sniff(data: bytes) -> tuple[bool, str]:
    """:func:`looks_like_csv` on a whole file held in memory."""
    return looks_like_csv(data[:SNIFF_BYTES], at_eof=len(data) <= SNIFF_BYTES)


def intervals_in_day(day: date) -> int:
    """Quarter hours in ``day``, local time in America/Chicago: 96, 92 or 100."""
    start = datetime(day.year, day.month, day.day, tzinfo=TIMEZONE)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=TIMEZONE)
    seconds = end.timestamp() - start.timestamp()
    return int(seconds // INTERVAL.total_seconds())


@dataclass
class DataSummary:
    """What one interval CSV holds (JSON-ready through :meth:`to_dict`)."""

    layout: str  # smt-interval | intelliwatt | unknown
    rows: int = 0
    esiids: list[str] = field(default_factory=list)
    first_interval: str | None = None  # local start of the first interval, ISO
    last_interval: str | None = None  # local start of the last interval, ISO
    first_day: str | None = None
    last_day: str | None = None
    intervals_present: int = 0
    intervals_expected: int = 0
    estimated: int = 0
    kwh_total: float = 0.0
    gap_days: dict[str, int] = field(default_factory=dict)  # day → intervals present (< expected)
    gap_day_count: int = 0
    bad_rows: int = 0  # rows whose date or kWh could not be read

    @property
    def missing(self) -> int:
        return max(0, self.intervals_expected - self.intervals_present)

    @property
    def estimated_share(self) -> float:
        return self.estimated / self.intervals_present if self.intervals_present else 0.0

    @property
    def days(self) -> int:
        if self.first_day is None or self.last_day is None:
            return 0
        return (date.fromisoformat(self.last_day) - date.fromisoformat(self.first_day)).days + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "rows": self.rows,
            "esiids": self.esiids,
            "first_interval": self.first_interval,
            "last_interval": self.last_interval,
            "first_day": self.first_day,
            "last_day": self.last_day,
            "days": self.days,
            "intervals_present": self.intervals_present,
            "intervals_expected": self.intervals_expected,
            "intervals_missing": self.missing,
            "gap_days": self.gap_days,
            "gap_day_count": self.gap_day_count,
            "estimated": self.estimated,
            "estimated_share": round(self.estimated_share, 4),
            "kwh_total": round(self.kwh_total, 3),
            "bad_rows": self.bad_rows,
        }


def brief(summary: dict[str, Any]) -> str:
    """A :meth:`DataSummary.to_dict` (as stored in the ledger) as one log-line fragment."""
    if summary.get("layout") == "unknown":
        return f"layout=unknown rows={summary.get('rows', 0)}"
    span = f"{summary['first_day']}..{summary['last_day']}" if summary.get("first_day") else "none"
    return (
        f"layout={summary.get('layout')} esiids={','.join(summary.get('esiids') or []) or '-'} "
        f"days={span} intervals={summary.get('intervals_present', 0)}/"
        f"{summary.get('intervals_expected', 0)} missing={summary.get('intervals_missing', 0)} "
        f"gap-days={summary.get('gap_day_count', 0)} "
        f"estimated={float(summary.get('estimated_share', 0.0)):.1%} "
        f"kwh={float(summary.get('kwh_total', 0.0)):.3f}"
    )


def summarize(data: bytes) -> DataSummary:
    """Summarize an interval CSV held in memory (one pass over its rows)."""
    reader = csv.reader(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace"))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return DataSummary("unknown")
    names = tuple(h.strip().strip("'\"").upper() for h in header)
    try:
        if names[: len(SMT_HEADER)] == SMT_HEADER:
            return _Counter("smt-interval").feed(_smt_rows(reader)).finish()
        if names[: len(APP_HEADER)] == APP_HEADER:
            return _Counter("intelliwatt").feed(_app_rows(reader)).finish()
        summary = DataSummary("unknown")
        summary.rows = sum(1 for row in reader if row)
        return summary
    except csv.Error:
        return DataSummary("unknown")


# A parsed row: (esiid, day, local start, kWh or None, estimated); None for a row that failed.
Row = tuple[str | None, date, datetime, float | None, bool] | None


def _smt_rows(reader: Iterator[list[str]]) -> Iterator[Row]:
    for row in reader:
        if not row:
            continue
        try:
            month, day_, year = (int(p) for p in row[1].strip().split("/"))
            hour, minute = (int(p) for p in row[3].strip().split(":"))
            day = date(year, month, day_)
            start = datetime(year, month, day_) + timedelta(hours=hour, minutes=minute)
            kwh = float(row[5]) if row[5].strip() else None
        except (ValueError, IndexError):
            yield None
            continue
        yield normalize_esiid(row[0]), day, start, kwh, row[6].strip().upper() == "E"


def _app_rows(reader: Iterator[list[str]]) -> Iterator[Row]:
    origin: datetime | None = None  # the first day's local midnight, as an aware instant
    naive_origin: datetime | None = None
    for row in reader:
        if not row:
            continue
        try:
            stamp = datetime.fromisoformat(row[2].strip())
            kwh = float(row[3]) if row[3].strip() else None
        except (ValueError, IndexError):
            yield None
            continue
        if origin is None or naive_origin is None:
            naive_origin = datetime(stamp.year, stamp.month, stamp.day)
            origin = naive_origin.replace(tzinfo=TIMEZONE)
        # Consecutive steps from the first local midnight → the real local time and day.
        instant = datetime.fromtimestamp(
            origin.timestamp() + (stamp - naive_origin).total_seconds(), TIMEZONE
        )
        local = instant.replace(tzinfo=None)
        yield normalize_esiid(row[0]), local.date(), local, kwh, False


class _Counter:
    """Accumulates rows into a :class:`DataSummary`."""

    def __init__(self, layout: str) -> None:
        self.summary = DataSummary(layout)
        self.per_day: Counter[date] = Counter()
        self.esiids: dict[str, None] = {}
        self.first: datetime | None = None
        self.last: datetime | None = None

    def feed(self, rows: Iterator[Row]) -> _Counter:
        s = self.summary
        for row in rows:
            s.rows += 1
            if row is None:
                s.bad_rows += 1
                continue
            esiid, day, start, kwh, estimated = row
            if esiid:
                self.esiids.setdefault(esiid, None)
            self.per_day[day] += 0  # the day is covered by the file even if it holds no read
            if kwh is None:
                continue
            self.per_day[day] += 1
            s.intervals_present += 1
            s.kwh_total += kwh
            s.estimated += estimated
            if self.first is None or start < self.first:
                self.first = start
            if self.last is None or start > self.last:
                self.last = start
        return self

    def finish(self) -> DataSummary:
        s = self.summary
        s.esiids = list(self.esiids)
        if self.per_day:
            first_day, last_day = min(self.per_day), max(self.per_day)
            s.first_day, s.last_day = first_day.isoformat(), last_day.isoformat()
            day = first_day
            while day <= last_day:
                expected = intervals_in_day(day)
                s.intervals_expected += expected
                present = self.per_day.get(day, 0)
                if present < expected:
                    s.gap_day_count += 1
                    if len(s.gap_days) < MAX_GAP_DAYS:
                        s.gap_days[day.isoformat()] = present
                day += timedelta(days=1)
        if self.first is not None and self.last is not None:
            s.first_interval = self.first.isoformat(timespec="minutes")
            s.last_interval = self.last.isoformat(timespec="minutes")
        return s
