"""ESIID and meter attribution: name, then content, then defaults."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from smt_droplet.attribution import attribute, esiid_from_content
from smt_droplet.esiid import (
    FieldError,
    esiid_from_name,
    meter_from_name,
    normalize_esiid,
    parse_esiid,
)

ESIID = "10443720004529147"
HEADER = (
    b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,"
    b"ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION\n"
)


def test_name_takes_17_digits_starting_with_10() -> None:
    assert esiid_from_name(f"IntervalMeterUsage_{ESIID}_20251101.csv") == ESIID
    assert esiid_from_name(f"{ESIID}.csv") == ESIID


def test_name_ignores_longer_digit_runs_and_other_prefixes() -> None:
    assert esiid_from_name(f"x_{ESIID}9_y.csv") is None  # 18 digits (the old pattern)
    assert esiid_from_name(f"x_9{ESIID}_y.csv") is None
    assert esiid_from_name("x_20443720004529147_y.csv") is None  # not "10..."
    assert esiid_from_name("IntervalMeterUsage_20251101.csv") is None


def test_content_esiid_with_apostrophe() -> None:
    body = HEADER + f"'{ESIID},11/1/2024,11/3/2024 4:36,0:00,0:15,1.6,A,Consumption\n".encode()
    assert esiid_from_content(body) == ESIID


def test_content_esiid_plain_and_case_insensitive_header() -> None:
    body = f"esiid,Meter,kWh\n{ESIID},M1,0.25\n".encode()
    assert esiid_from_content(body) == ESIID


def test_content_without_esiid_column_or_bad_value() -> None:
    assert esiid_from_content(b"a,b\n1,2\n") is None
    assert esiid_from_content(HEADER + b"'123,11/1/2024\n") is None
    assert esiid_from_content(b"") is None


def test_content_cut_mid_line_ignores_the_fragment() -> None:
    assert esiid_from_content(HEADER + f"'{ESIID}"[:8].encode()) is None


def test_meter_token() -> None:
    assert meter_from_name(f"usage_{ESIID}_M2.csv") == "M2"
    assert meter_from_name("usage-m12-2025.csv") == "M12"
    assert meter_from_name("IntervalMeterUsage_2025.csv") is None
    assert meter_from_name("MM2.csv") is None


def test_attribute_prefers_name_then_content_then_defaults(tmp_path: Path) -> None:
    other = "10443720000000042"
    named = tmp_path / f"IntervalMeterUsage_{ESIID}_M3.csv"
    named.write_bytes(HEADER + f"'{other},1/1/2025\n".encode())
    got = attribute(named, [(None, None), ("10443720000000077", "M9")])
    assert (got.esiid, got.esiid_source, got.meter, got.meter_source) == (
        ESIID,
        "name",
        "M3",
        "name",
    )

    content = tmp_path / "export.csv"
    content.write_bytes(HEADER + f"'{other},1/1/2025\n".encode())
    got = attribute(content, [("10443720000000077", "M9")])
    assert (got.esiid, got.esiid_source, got.meter) == (other, "content", "M9")

    neither = tmp_path / "export2.csv"
    neither.write_bytes(b"a,b\n1,2\n")
    got = attribute(neither, [(None, None), ("bogus", None), ("10443720000000077", None)])
    assert (got.esiid, got.esiid_source, got.meter) == ("10443720000000077", "default", "M1")
    assert attribute(neither, [(None, "M1")]).esiid is None


def test_pgp_payload_is_not_read_as_csv(tmp_path: Path) -> None:
    asc = tmp_path / "DailyMeterUsage_2025.asc"
    asc.write_bytes(HEADER + f"'{ESIID},1/1/2025\n".encode())
    assert attribute(asc, [(None, "M1")]).esiid is None


def test_normalize() -> None:
    assert normalize_esiid(f"'{ESIID}'") == ESIID
    assert normalize_esiid(f" {ESIID} ") == ESIID
    assert normalize_esiid("1044372000452914") is None
    assert normalize_esiid(None) is None


@given(
    prefix=st.text(alphabet="abcXYZ_-.", max_size=8),
    tail=st.text(alphabet="abc_-.", max_size=8),
    digits=st.text(alphabet="0123456789", min_size=15, max_size=15),
)
def test_name_rule_property(prefix: str, tail: str, digits: str) -> None:
    esiid = "10" + digits
    assert esiid_from_name(f"{prefix}{esiid}{tail}.csv") == esiid
    assert esiid_from_name(f"{prefix}{esiid}7{tail}.csv") is None
    assert esiid_from_name(f"{prefix}3{esiid}{tail}.csv") is None


def test_one_esiid_rule_for_names_cells_and_request_fields() -> None:
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in ESIID)  # full-width digits
    assert normalize_esiid(fullwidth) is None  # a bare \\d would take them
    assert esiid_from_name(f"IntervalMeterUsage_{fullwidth}_20251101.csv") is None
    for quoted in (f"'{ESIID}'", f'"{ESIID}"', f" {ESIID} ", int(ESIID)):
        assert parse_esiid(quoted) == ESIID
    assert parse_esiid("  ") is None
    for bad in (fullwidth, True, 1.5, "1044372000452914", ["x"]):
        try:
            parse_esiid(bad)
        except FieldError as exc:
            assert exc.code == "bad_esiid"
        else:
            raise AssertionError(f"{bad!r} accepted")
