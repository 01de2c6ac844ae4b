"""What the spool requests claimed by a pass ask of it: the run's :class:`RunPlan`.

Spool requests (written by the webhook and the upload server) steer one pass:

* a request naming a ``filename`` (an upload) gives **that file only** its ESIID/meter default
  (the name is the inbox-relative path the upload server stored it under);
* requests without a file name (triggers) give the run's defaults, which apply **only to the
  files this pass downloaded from SFTP for the first time** (:attr:`RunPlan.fresh`): a trigger
  for one customer must never attribute another customer's file that happened to be waiting in
  the inbox. If the requests claimed together carry **different** ESIIDs (or meters), none of
  them is used — a wrong ESIID is worse than none — and the pass logs ``conflicting ESIIDs in
  spool requests``. Every other file without an ESIID of its own falls back to ``ESIID_DEFAULT``
  (or stays ``no-esiid``).
* ``force_repost`` re-posts files already in the ledger: only the named file if the request has
  a ``filename``, else every file in the inbox.

Defaults never beat what the file itself says (ESIID in the name or the CSV's ESIID column).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import spool
from .esiid import normalize_esiid

log = logging.getLogger("smt_droplet.ingest")


@dataclass
class RunPlan:
    """What the claimed spool requests ask of this pass."""

    esiid: str | None = None
    meter: str | None = None
    per_file: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    force_all: bool = False
    force_files: set[str] = field(default_factory=set)
    fresh: set[str] = field(default_factory=set)  # inbox paths this pass's sync downloaded

    def forces(self, rel: str) -> bool:
        """Whether a request asked to re-post the inbox file ``rel``."""
        return self.force_all or rel in self.force_files

    def defaults_for(self, rel: str) -> list[tuple[str | None, str | None]]:
        """The request defaults that may attribute ``rel``: its own upload's, then the run's
        (only for a file this pass downloaded)."""
        run = (self.esiid, self.meter) if rel in self.fresh else (None, None)
        return [self.per_file.get(rel, (None, None)), run]


def inbox_path(name: str) -> str:
    """A request's ``filename`` as the inbox-relative path the pass knows the file by."""
    return os.path.normpath(name.replace("\\", "/")).lstrip("/")


def plan_from_requests(requests: Iterable[spool.Request]) -> RunPlan:
    """Apply the rules in the module docstring."""
    plan = RunPlan()
    esiids: set[str] = set()
    meters: set[str] = set()
    for req in requests:
        esiid = normalize_esiid(req.esiid)
        meter = (req.meter or "").strip() or None
        if req.filename:
            name = inbox_path(req.filename)
            plan.per_file[name] = (esiid, meter)
            if req.force_repost:
                plan.force_files.add(name)
            continue
        if esiid:
            esiids.add(esiid)
        if meter:
            meters.add(meter)
        if req.force_repost:
            plan.force_all = True
    if len(esiids) == 1:
        plan.esiid = esiids.pop()
    elif esiids:
        log.warning(
            "conflicting ESIIDs in spool requests (%s); using none of them as the default",
            ",".join(sorted(esiids)),
        )
    if len(meters) == 1:
        plan.meter = meters.pop()
    elif meters:
        log.warning("conflicting meters in spool requests; using none of them as the default")
    return plan
