"""What the web app says it stored, beside what the file holds: the landing verdict.

A 200 from the app is not proof that the intervals landed (``docs/intelliwatt-contract.md``,
"what the app stores"): its parsers drop data older than its 365-day window, store gzip
content as nothing, and overwrite the repeated hour of the fall-back day. The large-file path
(``raw-upload``) answers with ``normalizedInline``, the app's own account of what it kept; the
inline path answers with no count at all. :func:`reconcile` puts that account beside the
droplet's own reading of the file (:class:`~smt_droplet.csvdata.DataSummary`, made once per
file before the post) and gives one verdict:

* ``exact`` — the app kept as many intervals as the file has, over the same span;
* ``short`` — the app kept some but fewer (``detail`` names the span when the bounds tell it,
  e.g. the repeated hour of a fall-back day);
* ``none`` — the app kept nothing (``normalizedInline: null`` or 0 intervals);
* ``mismatch`` — the app counts more intervals than the file has, as many over another span
  (a shifted clock), or the file's count is unknown (a layout the droplet does not read);
* ``unverified`` — the inline path: the app's answer carries no count.

``short``, ``none`` and ``mismatch`` are what :data:`NOT_LANDED` holds: the journal line warns,
the metrics count them (alert ``SmtIntervalsNotLanded``) and ``smt-droplet resend --landing``
selects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from .csvdata import INTERVAL, TIMEZONE, intervals_in_day

EXACT, SHORT, NONE, MISMATCH, UNVERIFIED = "exact", "short", "none", "mismatch", "unverified"
VERDICTS = (EXACT, SHORT, NONE, MISMATCH, UNVERIFIED)
NOT_LANDED = frozenset({SHORT, NONE, MISMATCH})


@dataclass
class AppCount:
    """The app's account, summed over the parts of one file (``normalizedInline``)."""

    intervals: int = 0
    first: str | None = None  # UTC ISO, ``2026-11-01T05:00:00Z``
    last: str | None = None
    kwh: float | None = None
    parts: int = 0
    parts_empty: int = 0  # parts answered with ``normalizedInline: null``

    def add(self, normalized: Any) -> None:
        """Fold one part's ``normalizedInline`` (a dict, or ``None``) into the sum."""
        self.parts += 1
        if not isinstance(normalized, dict):
            self.parts_empty += 1
            return
        count = _number(normalized.get("records"))
        if count is None:
            count = _number(normalized.get("intervalsInserted"))
        self.intervals += int(count or 0)
        if count:
            self.first = _earliest(self.first, _utc(normalized.get("tsMin")))
            self.last = _latest(self.last, _utc(normalized.get("tsMax")))
        diagnostics = normalized.get("diagnostics")
        kwh = _number(diagnostics.get("totalKwh")) if isinstance(diagnostics, dict) else None
        if kwh is not None:
            self.kwh = (self.kwh or 0.0) + kwh


@dataclass
class Landing:
    """One file's verdict (JSON-ready through :meth:`to_dict`; kept in the post log)."""

    verdict: str
    file: dict[str, Any] = field(default_factory=dict)
    app: dict[str, Any] | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "file": self.file, "app": self.app, "detail": self.detail}


def file_count(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The droplet's reading of the file: intervals, first and last start (UTC), kWh."""
    if not summary or summary.get("layout") in (None, "unknown"):
        return {"intervals": None, "first": None, "last": None, "kwh": None}
    return {
        "intervals": int(summary.get("intervals_present", 0)),
        "first": _local_to_utc(summary.get("first_interval")),
        "last": _local_to_utc(summary.get("last_interval")),
        "kwh": summary.get("kwh_total"),
    }


def unverified(summary: dict[str, Any] | None) -> Landing:
    """The inline path: the answer says nothing of what was stored."""
    mine = file_count(summary)
    return Landing(
        UNVERIFIED,
        mine,
        None,
        "the inline answer carries no count: the app's storage of these "
        f"{mine['intervals'] if mine['intervals'] is not None else '?'} intervals is not known",
    )


def reconcile(summary: dict[str, Any] | None, app: AppCount) -> Landing:
    """The verdict for a file whose parts the app answered (see the module docstring)."""
    mine = file_count(summary)
    theirs = {
        "intervals": app.intervals,
        "first": app.first,
        "last": app.last,
        "kwh": None if app.kwh is None else round(app.kwh, 3),
        "parts": app.parts,
    }
    have, want = app.intervals, mine["intervals"]
    if have == 0:
        why = "normalizedInline was null" if app.parts_empty == app.parts else "0 intervals"
        return Landing(NONE, mine, theirs, f"the app stored no interval of this file ({why})")
    if want is None:
        return Landing(
            MISMATCH, mine, theirs, f"the app stored {have} intervals; the file's layout is unknown"
        )
    if have > want:
        return Landing(
            MISMATCH, mine, theirs, f"the app counts {have} intervals; the file holds {want}"
        )
    if have == want and (app.first, app.last) == (mine["first"], mine["last"]):
        return Landing(EXACT, mine, theirs, f"the app stored all {want} intervals")
    if have == want:  # as many, somewhere else: a shifted clock
        return Landing(
            MISMATCH,
            mine,
            theirs,
            f"the app stored {have} intervals over {app.first}..{app.last}; the file's span "
            f"is {mine['first']}..{mine['last']}",
        )
    detail = f"the app stored {have} of {want} intervals"
    missing = _missing_spans(mine, app, want - have, summary or {})
    if missing:
        detail += f"; missing {missing}"
    return Landing(SHORT, mine, theirs, detail)


def brief(landing: dict[str, Any] | None) -> str:
    """One log-line fragment: ``landed=short app=288/file=292``."""
    if not landing:
        return ""
    app = (landing.get("app") or {}).get("intervals")
    mine = (landing.get("file") or {}).get("intervals")
    counts = f"app={'-' if app is None else app}/file={'-' if mine is None else mine}"
    return f"landed={landing.get('verdict')} {counts}"


# -- the span the app lacks ----------------------------------------------------------------


def _missing_spans(mine: dict[str, Any], app: AppCount, short: int, summary: dict[str, Any]) -> str:
    spans = []
    if mine["first"] and app.first and app.first > mine["first"]:
        spans.append(_span(mine["first"], _minus_interval(app.first)))
    if mine["last"] and app.last and app.last < mine["last"]:
        spans.append(_span(_plus_interval(app.last), mine["last"]))
    if spans:
        return ", ".join(spans)
    repeated = _repeated_hours(summary)
    if repeated and short == 4 * len(repeated):
        return ", ".join(f"{_span(a, b)} (the repeated hour of {day})" for day, a, b in repeated)
    return f"{short} intervals inside {mine['first']}..{mine['last']}"


def _repeated_hours(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Fall-back days the file covers: (day, UTC start and last start of the second 01:xx)."""
    first, last = summary.get("first_day"), summary.get("last_day")
    if not first or not last:
        return []
    out = []
    day = date.fromisoformat(first)
    end = date.fromisoformat(last)
    while day <= end:
        if intervals_in_day(day) == 100:
            second = datetime(day.year, day.month, day.day, 1, 0, tzinfo=TIMEZONE, fold=1)
            start = second.astimezone(UTC)
            out.append((day.isoformat(), _iso(start), _iso(start + 3 * INTERVAL)))
        day += timedelta(days=1)
    return out


def _span(first: str, last: str) -> str:
    """``2026-11-01 07:00-07:45Z`` (one day) or ``first..last``."""
    if first[:10] == last[:10]:
        return f"{first[:10]} {first[11:16]}-{last[11:16]}Z"
    return f"{first}..{last}"


# -- timestamps ----------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(value: Any) -> str | None:
    """An ISO timestamp from the app (``...Z`` or with an offset) as our UTC ISO form."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _iso(moment)


def _local_to_utc(value: Any) -> str | None:
    """A summary's local start (``2026-11-01T00:00``, America/Chicago) in UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return _iso(datetime.fromisoformat(value).replace(tzinfo=TIMEZONE))
    except ValueError:
        return None


def _plus_interval(value: str) -> str:
    return _iso(datetime.fromisoformat(value.replace("Z", "+00:00")) + INTERVAL)


def _minus_interval(value: str) -> str:
    return _iso(datetime.fromisoformat(value.replace("Z", "+00:00")) - INTERVAL)


def _earliest(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else max(a, b)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
