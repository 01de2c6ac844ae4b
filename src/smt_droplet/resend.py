"""Sending files again on purpose: ``smt-droplet resend``, ``ingest-now.yml -e smt_resend=...``.

When the app's parser is fixed or its data purged, what did not land must go again. A
selection — landing verdicts, an ESIID, a date range the file's data overlaps, or all posted
files — is taken from the post log; :func:`select` lists it (nothing is sent), :func:`queue`
puts one ``force_repost`` request per file in the spool. The next pass (the ``.path`` unit
starts one at once on the droplet) posts each file again through the usual pipeline and
records the app's new answer: the post log gets a new record whose landing verdict replaces the
old one, ``STATE_FILE`` keeps its single line. Files retention already took out of the inbox
cannot be sent from here; the selection names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from . import spool
from .config import ConfigError
from .esiid import normalize_esiid
from .landing import VERDICTS
from .ledger import Ledger


@dataclass(frozen=True)
class Selection:
    """What to send again: every criterion given must hold."""

    landing: frozenset[str] = frozenset()
    esiid: str | None = None
    since: date | None = None
    until: date | None = None
    everything: bool = False

    @classmethod
    def parse(
        cls,
        *,
        landing: str | None = None,
        esiid: str | None = None,
        since: str | None = None,
        until: str | None = None,
        everything: bool = False,
    ) -> Selection:
        """From the command line's words; raises ConfigError naming the bad one."""
        verdicts = frozenset(v.strip() for v in (landing or "").split(",") if v.strip())
        unknown = verdicts - set(VERDICTS) - {"no-verdict"}
        if unknown:
            raise ConfigError(
                f"--landing {','.join(sorted(unknown))}: one of {', '.join(VERDICTS)}, no-verdict"
            )
        who = None
        if esiid:
            who = normalize_esiid(esiid)
            if who is None:
                raise ConfigError(f"--esiid {esiid!r} is not 17 digits")
        selection = cls(verdicts, who, _day("--since", since), _day("--until", until), everything)
        if not (selection.landing or selection.esiid or since or until or everything):
            raise ConfigError(
                "say what to send again: --landing, --esiid, --since/--until or --all"
            )
        return selection

    def matches(self, record: dict[str, Any]) -> bool:
        verdict = (record.get("landing") or {}).get("verdict") or "no-verdict"
        if self.landing and verdict not in self.landing:
            return False
        if self.esiid and record.get("esiid") != self.esiid:
            return False
        summary = record.get("summary") or {}
        first, last = summary.get("first_day"), summary.get("last_day")
        if self.since and (not last or date.fromisoformat(last) < self.since):
            return False
        return not (self.until and (not first or date.fromisoformat(first) > self.until))


@dataclass
class Chosen:
    """The files a selection found: those that can go again, and those that cannot."""

    files: list[dict[str, Any]] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)  # no longer in the inbox


def select(ledger: Ledger, inbox: Path, selection: Selection) -> Chosen:
    """Posted files (the post log) that match ``selection``, split by whether they are still
    in the inbox. PGP deliveries are selected by their ``.asc``, not the CSV inside."""
    chosen = Chosen()
    for digest, record in sorted(ledger.apps.items(), key=lambda kv: str(kv[1].get("path"))):
        if digest not in ledger.posted or "!" in str(record.get("path", "")):
            continue
        if not selection.matches(record):
            continue
        row = {
            "sha256": digest,
            "path": record.get("path"),
            "esiid": record.get("esiid"),
            "meter": record.get("meter"),
            "landing": (record.get("landing") or {}).get("verdict") or "no-verdict",
            "detail": (record.get("landing") or {}).get("detail") or "",
        }
        path = inbox / str(record.get("path"))
        (chosen.files if path.is_file() else chosen.gone).append(row)
    return chosen


def queue(spool_dir: Path, files: list[dict[str, Any]], reason: str) -> int:
    """One ``force_repost`` request per file, with the ESIID and meter it was posted as (an
    upload's came from its request, which is gone); returns how many were queued."""
    spool.ensure_layout(spool_dir)
    for row in files:
        spool.enqueue(
            spool_dir,
            "cli",
            filename=row["path"],
            force_repost=True,
            reason=reason,
            esiid=row.get("esiid"),
            meter=row.get("meter"),
        )
    return len(files)


def _day(flag: str, value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not a date (YYYY-MM-DD)") from None
