"""Landing verdicts (landing.py): the app's count beside the file's own reading."""

from __future__ import annotations

from datetime import date

from smt_droplet.csvdata import summarize
from smt_droplet.landing import AppCount, brief, reconcile, unverified
from testbed.smt_csv import generate_interval_csv

ESIID = "10443720000000099"


def summary(start: date, days: int) -> dict:
    return summarize(generate_interval_csv(ESIID, start, days)).to_dict()


def counted(*parts: dict | None) -> AppCount:
    app = AppCount()
    for part in parts:
        app.add(part)
    return app


def part(records: int, ts_min: str, ts_max: str, kwh: float = 1.0) -> dict:
    return {
        "records": records,
        "intervalsInserted": records,
        "tsMin": ts_min,
        "tsMax": ts_max,
        "diagnostics": {"totalKwh": kwh},
    }


def test_exact_sums_the_parts_and_compares_the_span_in_utc() -> None:
    s = summary(date(2026, 6, 10), 2)  # CDT: local midnight is 05:00Z
    landing = reconcile(
        s,
        counted(
            part(96, "2026-06-10T05:00:00.000Z", "2026-06-11T04:45:00.000Z", 10.0),
            part(96, "2026-06-11T05:00:00.000Z", "2026-06-12T04:45:00.000Z", 11.5),
        ),
    )
    assert landing.verdict == "exact", landing
    assert landing.app == {
        "intervals": 192,
        "first": "2026-06-10T05:00:00Z",
        "last": "2026-06-12T04:45:00Z",
        "kwh": 21.5,
        "parts": 2,
    }
    assert landing.file["first"] == "2026-06-10T05:00:00Z" and landing.file["intervals"] == 192
    assert brief(landing.to_dict()) == "landed=exact app=192/file=192"


def test_a_cut_head_is_named_as_the_missing_span() -> None:
    s = summary(date(2026, 6, 10), 2)
    landing = reconcile(s, counted(part(96, "2026-06-11T05:00:00Z", "2026-06-12T04:45:00Z")))
    assert landing.verdict == "short"
    assert landing.detail == (
        "the app stored 96 of 192 intervals; missing 2026-06-10T05:00:00Z..2026-06-11T04:45:00Z"
    )


def test_the_repeated_fall_back_hour_is_named() -> None:
    s = summary(date(2026, 10, 31), 3)
    assert s["intervals_present"] == 292
    landing = reconcile(s, counted(part(288, "2026-10-31T05:00:00Z", "2026-11-03T05:45:00Z")))
    assert landing.verdict == "short"
    assert landing.detail == (
        "the app stored 288 of 292 intervals; missing 2026-11-01 07:00-07:45Z "
        "(the repeated hour of 2026-11-01)"
    )


def test_none_mismatch_and_unverified() -> None:
    s = summary(date(2026, 6, 10), 1)
    nothing = reconcile(s, counted(None, None))
    assert (nothing.verdict, nothing.detail) == (
        "none",
        "the app stored no interval of this file (normalizedInline was null)",
    )
    zero = reconcile(s, counted(part(0, "", "")))
    assert zero.verdict == "none" and "0 intervals" in zero.detail
    more = reconcile(s, counted(part(100, "2026-06-10T05:00:00Z", "2026-06-11T05:45:00Z")))
    assert more.verdict == "mismatch" and "counts 100 intervals; the file holds 96" in more.detail
    shifted = reconcile(s, counted(part(96, "2026-06-10T04:45:00Z", "2026-06-11T04:30:00Z")))
    assert shifted.verdict == "mismatch" and "over 2026-06-10T04:45:00Z..2026-06-11T04:30:00Z" in (
        shifted.detail
    )
    unknown = reconcile({"layout": "unknown", "rows": 3}, counted(part(3, "a", "b")))
    assert unknown.verdict == "mismatch" and "layout is unknown" in unknown.detail
    inline = unverified(s)
    assert (inline.verdict, inline.app) == ("unverified", None)
    assert brief(inline.to_dict()) == "landed=unverified app=-/file=96"
