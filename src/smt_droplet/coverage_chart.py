"""Data coverage per ESIID over the last days, from the ledger's posted files, drawn as SVG.

A day is ``complete`` when a posted file covers it with every interval (96, or 92/100 on the
DST days: :func:`smt_droplet.csvdata.intervals_in_day`), ``gaps`` when posted files cover it only
partly (the summary's ``gap_days``), ``missing`` when no posted file covers it, and ``due``
(not yet: grey, not counted missing) for today and yesterday without data — SMT delivers a day's
intervals the day after, so their absence says nothing yet. The SVG is
built here on the server, from numbers only (no text from a file reaches it but the ESIID, which
is escaped), and is served as ``image/svg+xml`` to the operator page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any
from xml.sax.saxutils import escape, quoteattr

COMPLETE, GAPS, MISSING, DUE = "complete", "gaps", "missing", "due"
RANK = {DUE: -1, MISSING: 0, GAPS: 1, COMPLETE: 2}
COLOURS = {COMPLETE: "#2e7d32", GAPS: "#f9a825", MISSING: "#c62828", DUE: "#b0bec5"}
DAYS = 90
NOT_DUE_DAYS = 2  # today and yesterday: their data may not have been delivered yet


@dataclass
class Coverage:
    """One ESIID's days, oldest first, ending ``today``."""

    esiid: str
    first: date
    states: list[str] = field(default_factory=list)

    def count(self, state: str) -> int:
        return self.states.count(state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "esiid": self.esiid,
            "from": self.first.isoformat(),
            "days": len(self.states),
            COMPLETE: self.count(COMPLETE),
            GAPS: self.count(GAPS),
            MISSING: self.count(MISSING),
            DUE: self.count(DUE),
        }


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def coverage(
    posted: Iterable[Mapping[str, Any]], today: date, days: int = DAYS
) -> dict[str, Coverage]:
    """Per ESIID (sorted), the state of each of the ``days`` days ending ``today``.

    ``posted``: the ledger's records of posted files (``Ledger.apps`` values), each with the
    ``esiid`` it was posted for and its data ``summary``."""
    first = today - timedelta(days=days - 1)
    found: dict[str, dict[date, str]] = {}
    for record in posted:
        esiid, summary = record.get("esiid"), record.get("summary")
        if not isinstance(esiid, str) or not isinstance(summary, Mapping):
            continue
        start, end = _day(summary.get("first_day")), _day(summary.get("last_day"))
        if start is None or end is None:
            continue
        gap_days = summary.get("gap_days")
        gaps = set(gap_days) if isinstance(gap_days, Mapping) else set()
        states = found.setdefault(esiid, {})
        day = max(start, first)
        while day <= min(end, today):
            state = GAPS if day.isoformat() in gaps else COMPLETE
            if RANK[state] > RANK[states.get(day, MISSING)]:
                states[day] = state
            day += timedelta(days=1)
    due_from = today - timedelta(days=NOT_DUE_DAYS - 1)

    def state_of(day: date, states: dict[date, str]) -> str:
        return states.get(day, DUE if day >= due_from else MISSING)

    return {
        esiid: Coverage(
            esiid, first, [state_of(first + timedelta(days=i), states) for i in range(days)]
        )
        for esiid, states in sorted(found.items())
    }


# 90 days are 900 units wide: the page shows the chart at least 560 px wide (scrolling inside
# its own box on a phone), where a 16-unit month label is about 10 px high.
CELL, GAP, HEIGHT, LABEL, FONT = 10, 1, 28, 20, 16


def svg(cov: Coverage) -> str:
    """A strip of one cell per day, oldest on the left, with a ``<title>`` per day (a browser
    shows it on hover; a screen reader reads the summary in the root's ``aria-label``)."""
    width = len(cov.states) * CELL
    label = (
        f"ESIID {cov.esiid}: {cov.count(COMPLETE)} complete, {cov.count(GAPS)} with gaps, "
        f"{cov.count(MISSING)} missing of the last {len(cov.states)} days"
        + (f" ({cov.count(DUE)} not due yet)" if cov.count(DUE) else "")
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {HEIGHT + LABEL}" '
        f'role="img" aria-label={quoteattr(label)}>',
        f"<title>{escape(label)}</title>",
    ]
    for i, state in enumerate(cov.states):
        day = cov.first + timedelta(days=i)
        parts.append(
            f'<rect x="{i * CELL}" y="0" width="{CELL - GAP}" height="{HEIGHT}" '
            f'fill="{COLOURS[state]}" data-state="{state}">'
            f"<title>{day.isoformat()}: {'not due yet' if state == DUE else state}</title></rect>"
        )
        if day.day == 1:
            parts.append(
                f'<text x="{i * CELL}" y="{HEIGHT + LABEL - 3}" font-size="{FONT}" '
                f'font-family="sans-serif">{day.strftime("%b")}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
