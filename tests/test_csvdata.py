"""The data summary of an interval CSV (csvdata.py): DST days, gaps, layouts, not-a-CSV.

Each test generates its own data with ``testbed/smt_csv.py``; the shared fixtures are checked
too where they are (``testbed.smt_csv.shared_fixture``; skipped otherwise)."""

from __future__ import annotations

from datetime import date

import pytest

from smt_droplet.csvdata import brief, intervals_in_day, looks_like_csv, sniff, summarize
from testbed.smt_csv import (
    dst_fall_back,
    dst_spring_forward,
    generate_app_csv,
    generate_interval_csv,
    interval_rows,
    shared_fixture,
)

ESIID = "10443720000000099"


def _fixture(rel: str) -> bytes:
    path = shared_fixture(rel)
    if path is None:
        pytest.skip(f"shared fixture {rel} not present on this machine")
    return path.read_bytes()


def test_day_lengths_in_america_chicago() -> None:
    for year in (2024, 2025, 2026):
        assert intervals_in_day(dst_spring_forward(year)) == 92
        assert intervals_in_day(dst_fall_back(year)) == 100
    assert intervals_in_day(date(2025, 7, 4)) == 96


@pytest.mark.parametrize(
    ("day", "expected"),
    [(dst_spring_forward(2025), 92), (dst_fall_back(2025), 100), (date(2025, 6, 1), 96)],
)
def test_one_generated_day_is_complete(day: date, expected: int) -> None:
    s = summarize(generate_interval_csv(ESIID, day, 1))
    assert s.layout == "smt-interval" and s.esiids == [ESIID]
    assert (s.intervals_present, s.intervals_expected, s.missing) == (expected, expected, 0)
    assert s.gap_days == {} and s.first_day == s.last_day == day.isoformat()
    assert s.first_interval == f"{day.isoformat()}T00:00"
    assert s.last_interval == f"{day.isoformat()}T23:45"


def test_a_year_has_every_interval_and_the_right_totals() -> None:
    data = generate_interval_csv(ESIID, date(2024, 11, 1), 365, seed=5)
    s = summarize(data)
    assert s.days == 365 and s.intervals_expected == 365 * 96  # one 92-day, one 100-day
    assert s.intervals_present == s.intervals_expected and s.gap_day_count == 0
    rows = [line.split(",") for line in data.decode().splitlines()[1:]]
    assert s.rows == len(rows) == 35_044  # 365*96, +4 repeated, the 4 empty ones are rows too
    kwh = sum(float(r[5]) for r in rows if r[5])
    assert s.kwh_total == pytest.approx(kwh)
    assert s.estimated == sum(1 for r in rows if r[6] == "E") > 0
    assert 0 < s.estimated_share < 0.01


def test_missing_intervals_are_counted_per_day() -> None:
    lines = interval_rows(ESIID, date(2025, 3, 8), 3, seed=1)  # 3/8, 3/9 (92), 3/10
    del lines[96 + 40 : 96 + 50]  # ten rows of the spring-forward day (all with kWh)
    del lines[-1]  # the last interval of 3/10
    header = generate_interval_csv(ESIID, date(2025, 3, 8), 0).decode()
    s = summarize((header + "\n".join(lines) + "\n").encode())
    assert s.intervals_expected == 96 + 92 + 96
    assert s.missing == 11 and s.gap_day_count == 2
    assert s.gap_days == {"2025-03-09": 82, "2025-03-10": 95}
    assert s.last_interval == "2025-03-10T23:30"
    assert "missing=11" in brief(s.to_dict()) and "gap-days=2" in brief(s.to_dict())


def test_a_day_with_no_reads_at_all_is_a_gap_of_zero() -> None:
    lines = interval_rows(ESIID, date(2025, 5, 1), 3)
    keep = [line for line in lines if ",5/2/2025," not in line]
    header = generate_interval_csv(ESIID, date(2025, 5, 1), 0).decode()
    s = summarize((header + "\n".join(keep) + "\n").encode())
    assert s.days == 3 and s.gap_days == {"2025-05-02": 0} and s.missing == 96


def test_shared_fixture_year_and_dst_days() -> None:
    s = summarize(_fixture("smt/IntervalMeterUsage_10443720000000099_20251101.csv"))
    assert (s.first_day, s.last_day) == ("2024-11-01", "2025-10-31")
    assert s.intervals_present == s.intervals_expected == 35_040 and s.missing == 0
    assert s.estimated == 115


@pytest.mark.parametrize(
    ("day", "expected"), [(dst_spring_forward(2025), 92), (dst_fall_back(2025), 100)]
)
def test_app_layout_dst_days(day: date, expected: int) -> None:
    s = summarize(generate_app_csv("10443720000000001", day))
    assert s.layout == "intelliwatt" and s.days == 1
    assert s.intervals_present == s.intervals_expected == expected and s.missing == 0


@pytest.mark.parametrize(("name", "expected"), [("dst_spring.csv", 92), ("dst_fall.csv", 100)])
def test_app_layout_dst_fixtures(name: str, expected: int) -> None:
    s = summarize(_fixture(f"intelliwatt/{name}"))
    assert s.layout == "intelliwatt" and s.days == 1
    assert s.intervals_present == s.intervals_expected == expected and s.missing == 0


def test_unknown_layout_still_counts_rows() -> None:
    s = summarize(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n3/9/2025,2.0\n")
    assert s.layout == "unknown" and s.rows == 2
    assert brief(s.to_dict()) == "layout=unknown rows=2"


def test_bad_rows_are_counted_not_fatal() -> None:
    data = generate_interval_csv(ESIID, date(2025, 6, 1), 1) + b"'10443720000000099,13/45/2025,x\n"
    s = summarize(data)
    assert s.bad_rows == 1 and s.intervals_present == 96


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"PK\x03\x04\x14\x00\x00\x00", "binary"),
        (b"<!DOCTYPE html>\n<html><body>Service Unavailable, retry</body></html>", "HTML"),
        (b"<html>,<body>\n", "HTML"),
        (b"just some words\nno commas\n", "comma"),
    ],
)
def test_not_a_csv(data: bytes, why: str) -> None:
    ok, reason = sniff(data)
    assert not ok and why in reason
    assert looks_like_csv(b"ESIID,USAGE_DATE\n", at_eof=True) == (True, "")
