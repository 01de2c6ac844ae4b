"""Metrics in the Prometheus text format, written with ``prometheus_client`` (Debian:
``python3-prometheus-client``), imported only here and only when metrics are wanted.

After every pass :func:`write_pass_metrics` replaces ``smt_ingest.prom`` in the textfile
directory (``prometheus_client.write_to_textfile``: a temp file, then a rename, so the collector
never reads half a file). Every name starts with ``smt_ingest_``; the alerting rules in
``monitoring/`` use them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .landing import VERDICTS
from .outcomes import Outcome

log = logging.getLogger("smt_droplet.ingest")

TEXTFILE = "smt_ingest.prom"


def write_pass_metrics(directory: Path, record: Mapping[str, Any]) -> Path | None:
    """``directory/smt_ingest.prom`` from a :func:`~smt_droplet.passrecord.finish_pass` record;
    ``None`` (one warning) when it cannot be written: metrics never fail a pass."""
    try:
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    except ImportError:
        log.warning("metrics: prometheus_client is not installed (python3-prometheus-client)")
        return None
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float | None, **labels: str) -> None:
        if value is None:
            return
        g = Gauge(name, doc, list(labels), registry=registry)
        (g.labels(**labels) if labels else g).set(value)

    gauge(
        "smt_ingest_last_pass_start_timestamp_seconds",
        "Start of the last pass.",
        record.get("started_ts"),
    )
    gauge(
        "smt_ingest_last_pass_end_timestamp_seconds",
        "End of the last pass.",
        record.get("finished_ts"),
    )
    gauge(
        "smt_ingest_last_pass_exit_code",
        "Exit code of the last pass (0 ok, 1 retry, 2 config).",
        record.get("exit_code"),
    )
    gauge(
        "smt_ingest_last_success_timestamp_seconds",
        "End of the last pass that exited 0.",
        record.get("last_success_ts"),
    )
    gauge(
        "smt_ingest_last_pass_duration_seconds",
        "Wall time of the last pass.",
        record.get("duration_seconds"),
    )
    gauge(
        "smt_ingest_last_pass_sync_seconds",
        "SFTP sync time of the last pass.",
        record.get("sync_seconds"),
    )
    gauge(
        "smt_ingest_last_pass_post_seconds",
        "Posting time of the last pass.",
        record.get("post_seconds"),
    )
    gauge(
        "smt_ingest_last_pass_downloaded_bytes",
        "Bytes the last pass downloaded.",
        record.get("bytes_downloaded"),
    )
    gauge(
        "smt_ingest_last_pass_posted_bytes",
        "Bytes of the files the last pass posted.",
        record.get("bytes_posted"),
    )
    gauge(
        "smt_ingest_files_needing_operator",
        "Files that need a person (no ESIID, rejected, too large, not a CSV).",
        record.get("needs_operator"),
    )
    gauge(
        "smt_ingest_inbox_files",
        "Files in the inbox the last pass looked at.",
        record.get("inbox_files"),
    )
    gauge("smt_ingest_inbox_bytes", "Their bytes.", record.get("inbox_bytes"))
    gauge(
        "smt_ingest_free_bytes", "Free bytes on the spool's file system.", record.get("free_bytes")
    )
    gauge(
        "smt_ingest_last_pass_intervals_posted",
        "Intervals with a reading in the CSVs the last pass posted.",
        record.get("intervals_posted"),
    )
    gauge(
        "smt_ingest_last_pass_intervals_missing",
        "Expected intervals missing from the CSVs the last pass posted.",
        record.get("intervals_missing"),
    )
    gauge(
        "smt_ingest_last_pass_files_with_gaps",
        "Posted CSVs of the last pass with at least one day short of intervals.",
        record.get("files_with_gaps"),
    )
    gauge(
        "smt_ingest_last_pass_files_layout_unknown",
        "Posted CSVs of the last pass in a layout the summary does not know.",
        record.get("files_layout_unknown"),
    )
    gauge(
        "smt_ingest_last_pass_files_skipped_low_space",
        "Files the last pass did not download: the inbox was below SMT_MIN_FREE_MB.",
        record.get("skipped_no_space"),
    )
    gauge(
        "smt_ingest_last_pass_files_retired",
        "Posted files the last pass took out of the inbox (retention).",
        record.get("retired"),
    )
    gauge(
        "smt_ingest_last_pass_remote_completed",
        "Posted files the last pass deleted or moved on SFTP.",
        record.get("remote_completed"),
    )
    gauge(
        "smt_ingest_last_pass_remote_completion_failed",
        "Posted files whose remote completion failed in the last pass (tried again).",
        record.get("remote_completion_failed"),
    )
    gauge(
        "smt_ingest_last_pass_intervals_landed",
        "Intervals the app says it stored of the CSVs the last pass posted (raw-upload answers).",
        record.get("intervals_landed"),
    )
    gauge(
        "smt_ingest_files_waiting_for_app",
        "Inbox files the app cannot place yet (HOME_ID_REQUIRED: an ESIID it does not know).",
        record.get("waiting_for_app"),
    )
    landed = Gauge(
        "smt_ingest_last_pass_files_landed",
        "Files the last pass posted, by landing verdict (what the app says it stored).",
        ["verdict"],
        registry=registry,
    )
    verdicts = record.get("landing") or {}
    for verdict in VERDICTS:
        landed.labels(verdict=verdict).set(verdicts.get(verdict, 0))
    counts = record.get("counts") or {}
    files = Gauge(
        "smt_ingest_last_pass_files",
        "Files of the last pass by outcome.",
        ["outcome"],
        registry=registry,
    )
    for outcome in Outcome:
        files.labels(outcome=str(outcome)).set(counts.get(str(outcome), 0))
    info = Gauge(
        "smt_ingest_last_pass_info", "Who ran the last pass.", ["trigger"], registry=registry
    )
    info.labels(trigger=str(record.get("trigger", ""))).set(1)
    target = Path(directory) / TEXTFILE
    try:
        write_to_textfile(str(target), registry)
        # node_exporter runs as its own user; the units' UMask=0007 would hide the file from it
        # (metrics hold no secret).
        target.chmod(0o644)
    except OSError as exc:
        log.warning("metrics: cannot write %s: %s", target, exc.strerror or exc)
        return None
    return target
