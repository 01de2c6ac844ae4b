"""One SFTP sync with a journal line per file (the pass, ``smt-droplet sync`` and the
``smt_sftp_sync`` module all sync through :func:`run_sync`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .config import SftpSettings

log = logging.getLogger("smt_droplet.ingest")


def run_sync(
    settings: SftpSettings,
    *,
    dry_run: bool = False,
    pkey: Any = None,
    retired: Mapping[str, list[Any]] | None = None,
) -> Any:
    """Mirror once and log per file; returns the ``sftp_mirror.MirrorResult``.

    ``retired``: the ledger's files that retention took out of the inbox (read from
    ``settings.state_file`` when not given), so they are not downloaded again."""
    from .sftp_mirror import mirror  # paramiko is imported only when a sync runs

    if retired is None and settings.state_file is not None:
        from .ledger import read_retired

        retired = read_retired(settings.state_file)
    mirrored = mirror(settings, dry_run=dry_run, pkey=pkey, retired=retired)
    log_sync(mirrored)
    return mirrored


def log_sync(mirrored: Any) -> None:
    for f in mirrored.files:
        if f.status == "downloaded":
            log.info("downloaded %s size=%d", f.rel, f.size)
        elif f.status in ("skipped-young", "skipped-growing", "skipped-no-space"):
            log.info("%s %s %s", f.status, f.rel, f.reason)
        elif f.status == "failed":
            log.warning("download-failed %s %s", f.rel, f.reason)
        elif f.status == "would-download":
            log.info("would-download %s size=%d", f.rel, f.size)
    if mirrored.error:
        log.error("sync-failed %s", mirrored.error)
