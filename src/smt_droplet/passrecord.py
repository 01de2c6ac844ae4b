"""One record of every pass, whoever ran it (the timer, the ``.path`` unit, ``ingest-now.yml``'s
module, ``smt-droplet post``), and what ``/health`` and the alerts make of it.

:func:`finish_pass` writes, atomically:

* the last-result record ``<SMT_SPOOL_DIR>/status/last-ingest.json`` (``/health``,
  ``status``, ``upload-csv.yml``): the pass's counts and exit code, its timings and bytes, who
  ran it (``trigger``), ``last_success_ts`` (carried over from the previous record when this
  pass failed) and ``files``: name, outcome, ESIID, meter, the app's id and the reason of each
  file the pass did something with;
* the metrics file ``<SMT_METRICS_DIR>/smt_ingest.prom`` for node_exporter's textfile collector
  (:mod:`smt_droplet.metrics`).

:func:`verdict` is the one place that decides whether the ingest is healthy: the last pass
exited 0 (or none ran yet) and the last success is younger than ``SMT_STALE_AFTER``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from . import spool
from .config import RecordSettings
from .outcomes import ACCEPTED_OUTCOMES, FileResult, Outcome, PassResult

log = logging.getLogger("smt_droplet.ingest")

# Files a record lists: what happened to each file the pass did something with (an idle
# pass's already-posted and ignored files are only counted).
QUIET = frozenset({Outcome.SKIPPED_POSTED, Outcome.IGNORED})
MAX_FILES = 200


def trigger_of(env: Mapping[str, str] | None = None) -> str:
    """``systemd`` under a unit (timer, ``.path``), else ``command`` (an operator's shell)."""
    return "systemd" if "INVOCATION_ID" in (env if env is not None else os.environ) else "command"


def finish_pass(settings: RecordSettings, result: PassResult, *, trigger: str) -> dict[str, Any]:
    """Write the last-result record and the metrics of ``result``; returns the record."""
    previous = spool.read_last_result(settings.spool_dir) or {}
    now = time.time()
    record = result.to_dict()
    record.update(
        trigger=trigger,
        finished_ts=round(now, 3),
        duration_seconds=round(now - result.started_at, 3),
        files=[_brief(f) for f in result.files if f.outcome not in QUIET][:MAX_FILES],
        **_data(result),
    )
    record["last_success_ts"] = (
        record["finished_ts"] if result.exit_code == 0 else previous.get("last_success_ts")
    )
    try:
        record["free_bytes"] = shutil.disk_usage(settings.spool_dir).free
    except OSError:
        record["free_bytes"] = None
    if settings.spool_dir.is_dir():
        spool.write_last_result(settings.spool_dir, record)
    if settings.metrics_dir is not None:
        from .metrics import write_pass_metrics

        write_pass_metrics(settings.metrics_dir, record)
    return record


def verdict(record: Mapping[str, Any] | None, stale_after: float, now: float | None = None) -> str:
    """Why the ingest needs attention, or ``""`` when it is healthy (no record yet: healthy)."""
    if not record:
        return ""
    now = time.time() if now is None else now
    code = record.get("exit_code")
    if isinstance(code, int) and code != 0:
        return f"the last ingest pass failed (exit {code})"
    last = record.get("last_success_ts")
    if isinstance(last, int | float) and now - last > stale_after:
        return f"no successful ingest pass for {(now - last) / 3600:.1f} h"
    return ""


def _brief(f: FileResult) -> dict[str, Any]:
    return {
        "path": f.path,
        "outcome": str(f.outcome),
        "esiid": f.esiid,
        "meter": f.meter,
        "app_id": f.app_id,
        "reason": f.reason,
        "needs_operator": f.needs_operator,
        "landing": f.landing,
    }


def _data(result: PassResult) -> dict[str, Any]:
    """What the data summaries of the files this pass posted add up to, and what the app says
    it stored of them (``intervals_landed`` counts only files the app gave a count for)."""
    accepted = [f for f in result.files if f.outcome in ACCEPTED_OUTCOMES]
    posted = [f.summary for f in accepted if f.summary]
    landings = [f.landing for f in accepted if f.landing]
    counted = [(x.get("app") or {}).get("intervals") for x in landings]
    return {
        "intervals_posted": sum(int(s.get("intervals_present", 0)) for s in posted),
        "intervals_missing": sum(int(s.get("intervals_missing", 0)) for s in posted),
        "files_with_gaps": sum(1 for s in posted if s.get("gap_day_count")),
        "files_layout_unknown": sum(1 for s in posted if s.get("layout") == "unknown"),
        "intervals_landed": sum(int(n) for n in counted if isinstance(n, int)),
        "landing": dict(Counter(str(x.get("verdict")) for x in landings)),
    }
