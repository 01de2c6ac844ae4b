#!/usr/bin/env python3
"""Synthetic Smart Meter Texas interval CSVs in the real export layout.

Layout (as in SMT's ``IntervalMeterUsage_*.csv`` exports)::

    ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,...
    '10443720000000099,11/1/2024,11/3/2024 4:36,0:00,0:15,1.618,A,Consumption

* the ESIID carries a leading apostrophe; dates are ``M/D/YYYY``, times ``H:MM`` (no zero pad);
* one row per 15 minutes, the day's last interval ends at ``0:00``;
* US DST fall-back day (first Sunday of November): 100 rows, the 1:00-2:00 hour appears twice;
* spring-forward day (second Sunday of March): 96 rows, the 2:00-3:00 rows have empty kWh and flag;
* ``REVISION_DATE`` is the usage date + 2 days at a random ``H:MM``, the same for a whole day;
* kWh with three decimals, flag ``A`` (actual) or rarely ``E`` (estimated); LF line endings.

Stdlib only: this file is copied into containers and run with the system python3.
Output is deterministic for (esiid, start, days, seed).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

# The team's shared fixtures (real-layout SMT and app files) sit beside a checkout on our
# machines (``../shared/fixtures``), or where SMT_SHARED_FIXTURES says. One rule for the tests
# and the benchmark; everything that uses them also runs on generated data without them.
SHARED_FIXTURES = Path(
    os.environ.get("SMT_SHARED_FIXTURES")
    or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
)


def shared_fixture(rel: str) -> Path | None:
    """``SHARED_FIXTURES / rel`` when that file exists, else None."""
    path = SHARED_FIXTURES / rel
    return path if path.is_file() else None


HEADER = (
    "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,"
    "USAGE_KWH,ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION"
)
ESTIMATED_RATE = 0.0033  # ~115 of 35,040 rows in the fixture are estimated


def random_esiid(seed: int = 0) -> str:
    """A 17-digit ESIID starting with ``10`` (Texas ESIIDs), deterministic for ``seed``."""
    rng = random.Random(f"esiid:{seed}")  # noqa: S311 - test data, not crypto
    return "10" + "".join(str(rng.randrange(10)) for _ in range(15))


def _nth_sunday(year: int, month: int, n: int) -> date:
    first = date(year, month, 1)
    offset = (6 - first.weekday()) % 7  # weekday(): Monday=0 .. Sunday=6
    return first + timedelta(days=offset + 7 * (n - 1))


def dst_spring_forward(year: int) -> date:
    """Second Sunday of March (US rules since 2007)."""
    return _nth_sunday(year, 3, 2)


def dst_fall_back(year: int) -> date:
    """First Sunday of November (US rules since 2007)."""
    return _nth_sunday(year, 11, 1)


def _fmt_date(d: date) -> str:
    return f"{d.month}/{d.day}/{d.year}"


def _fmt_time(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60}:{minutes % 60:02d}"


def _day_intervals(day: date) -> list[tuple[int, bool]]:
    """(start minute, missing) for each row of ``day``, in SMT's order."""
    quarter = list(range(0, 24 * 60, 15))
    if day == dst_fall_back(day.year):
        # 0:00 .. 1:45, then 1:00 .. 1:45 again (the repeated hour), then 2:00 .. 23:45
        rows = [m for m in quarter if m < 120] + [m for m in quarter if 60 <= m < 120]
        rows += [m for m in quarter if m >= 120]
        return [(m, False) for m in rows]
    if day == dst_spring_forward(day.year):
        return [(m, 120 <= m < 180) for m in quarter]
    return [(m, False) for m in quarter]


def interval_rows(esiid: str, start: date, days: int, seed: int = 0) -> list[str]:
    """The data rows (without header) as CSV lines, no line terminator."""
    esiid = esiid.strip("'")
    rng = random.Random(f"rows:{seed}:{esiid}:{start.isoformat()}")  # noqa: S311
    out: list[str] = []
    for offset in range(days):
        day = start + timedelta(days=offset)
        revision = day + timedelta(days=2)
        rev = f"{_fmt_date(revision)} {rng.randrange(24)}:{rng.randrange(60):02d}"
        prefix = f"'{esiid},{_fmt_date(day)},{rev},"
        for minute, missing in _day_intervals(day):
            times = f"{_fmt_time(minute)},{_fmt_time(minute + 15)}"
            if missing:
                out.append(f"{prefix}{times},,,Consumption")
                continue
            kwh = rng.randint(20, 1900) / 1000
            flag = "E" if rng.random() < ESTIMATED_RATE else "A"
            out.append(f"{prefix}{times},{kwh:.3f},{flag},Consumption")
    return out


def generate_interval_csv(esiid: str, start: date, days: int, seed: int = 0) -> bytes:
    """A complete SMT interval CSV: header + ``days`` days of 15-minute rows from ``start``.

    A 365-day file is ~35,040 rows and ~2.6 MB, like a real 12-month export.
    """
    if days < 0:
        raise ValueError(f"days={days} must not be negative")
    lines = [HEADER, *interval_rows(esiid, start, days, seed)]
    return ("\n".join(lines) + "\n").encode("ascii")


def write_interval_csv(path: str | Path, esiid: str, start: date, days: int, seed: int = 0) -> Path:
    """Write :func:`generate_interval_csv` output to ``path`` (parents created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(generate_interval_csv(esiid, start, days, seed))
    return target


APP_HEADER = "ESIID,Meter,Start Date/Time,Usage (kWh)"


def generate_app_csv(esiid: str, day: date, kwh: float = 0.2) -> bytes:
    """One day in the app's own layout (ESIID, meter, start, kWh): as many rows as the day has
    intervals (92 on the spring-forward day, 100 on the fall-back day, 96 otherwise), their
    starts counted in 15-minute steps from midnight (the app's files run on past the DST jump:
    the spring day ends at 22:45, the fall day at 00:45 the next day)."""
    rows = [APP_HEADER]
    midnight = datetime.combine(day, datetime.min.time())
    for i in range(sum(not missing for _, missing in _day_intervals(day))):
        start = (midnight + timedelta(minutes=15 * i)).isoformat()
        rows.append(f"{esiid},M1,{start},{kwh:.2f}")
    return ("\n".join(rows) + "\n").encode()


def default_filename(esiid: str, start: date, days: int) -> str:
    """``IntervalMeterUsage_<esiid>_<end date YYYYMMDD>.csv`` like SMT's exports."""
    end = start + timedelta(days=days)
    digits = esiid.strip("'")
    return f"IntervalMeterUsage_{digits}_{end:%Y%m%d}.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic SMT 15-minute interval CSV.")
    parser.add_argument("--esiid", help="17-digit ESIID (default: random_esiid(--seed))")
    parser.add_argument("--start", default="2024-11-01", help="first usage date, YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=365, help="number of days (default 365)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out",
        help="output file or directory (default: IntervalMeterUsage_<esiid>_<end>.csv in .); "
        "'-' writes to stdout",
    )
    args = parser.parse_args(argv)
    esiid = args.esiid or random_esiid(args.seed)
    start = date.fromisoformat(args.start)
    data = generate_interval_csv(esiid, start, args.days, args.seed)
    if args.out == "-":
        sys.stdout.buffer.write(data)
        return 0
    out = Path(args.out or ".")
    if out.is_dir():
        out = out / default_filename(esiid, start, args.days)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    rows = data.count(b"\n") - 1
    print(f"wrote {out} ({len(data)} bytes, {rows} rows, esiid {esiid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
