"""The sanitizer that turns an untrusted upload name into a safe, ingest-visible file name."""

from __future__ import annotations

import fnmatch
import re
import time

from hypothesis import example, given, settings
from hypothesis import strategies as st

from smt_droplet import filenames

SAFE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
INGEST_GLOBS = ("*.csv", "*.csv.*")


def ingest_sees(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in INGEST_GLOBS)


@given(st.text(max_size=400))
@example("../../etc/passwd")
@example("..")
@example("...csv")
@example("a/../../b.csv")
@example("C:\\Users\\x\\Desktop\\usage.CSV")
@example("\x00\x01\x1f\x7f.csv")
@example("\u202ecsv.exe")
@example(".csv")
@example("-rf .csv")
@settings(max_examples=1000, deadline=None)
def test_sanitized_names_are_safe(name: str) -> None:
    out = filenames.sanitize_filename(name)
    assert SAFE.match(out), out
    assert ".." not in out
    assert "/" not in out and "\\" not in out
    assert out.isascii() and out.isprintable()
    assert len(out) <= filenames.MAX_STEM + len(".csv.999999")
    assert ingest_sees(out)
    assert filenames.is_csv_name(out)
    assert filenames.sanitize_filename(out) == out  # idempotent


@given(st.text(max_size=300), st.floats(min_value=0, max_value=4_000_000_000))
@settings(max_examples=300, deadline=None)
def test_stored_names_carry_a_utc_stamp(name: str, now: float) -> None:
    out = filenames.stored_name(name, now)
    stamp, _, rest = out.partition("_")
    assert stamp == time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    assert rest == filenames.sanitize_filename(name)
    assert SAFE.match(out) and ingest_sees(out)
    assert len(out.encode()) < 255  # NAME_MAX


def test_temp_names_are_invisible_to_ingest() -> None:
    names = {filenames.temp_name() for _ in range(200)}
    assert len(names) == 200
    for tmp in names:
        assert filenames.is_temp_name(tmp)
        assert not ingest_sees(tmp)
        assert tmp.startswith(".")


def test_examples() -> None:
    s = filenames.sanitize_filename
    assert (
        s("IntervalMeterUsage_10443720000000099.csv") == "IntervalMeterUsage_10443720000000099.csv"
    )
    assert s("../../etc/cron.d/evil.csv") == "evil.csv"
    assert s("C:\\Users\\me\\usage.CSV") == "usage.csv"
    assert s("my usage (1).csv") == "my_usage_1.csv"
    assert s("café.csv") == "cafe.csv"
    assert s("export.CSV.3") == "export.csv.3"
    assert s(".hidden.csv") == "hidden.csv"
    assert s("...csv") == "upload.csv"
    assert s("a..b.csv") == "a.b.csv"
    assert s("") == "upload.csv"
    assert s("x" * 500 + ".csv") == "x" * filenames.MAX_STEM + ".csv"


def test_csv_extension_detection() -> None:
    assert filenames.is_csv_name("a.csv")
    assert filenames.is_csv_name("a.CSV")
    assert filenames.is_csv_name("dir/a.csv.12")
    assert not filenames.is_csv_name("a.csv.asc")
    assert not filenames.is_csv_name("a.txt")
    assert not filenames.is_csv_name("a.csv/")
    assert not filenames.is_csv_name("csv")


def test_with_counter_keeps_the_extension() -> None:
    assert filenames.with_counter("20250101T000000_a.csv", 2) == "20250101T000000_a-2.csv"
    assert filenames.with_counter("20250101T000000_a.csv.3", 1) == "20250101T000000_a-1.csv.3"
