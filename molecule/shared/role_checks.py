"""Checks shared by the role scenarios' testinfra tests (smt_ingest, smt_webhook, smt_upload).

Each scenario's ``tests/conftest.py`` puts this directory on ``sys.path`` and re-exports the
report hook; the test modules import the helpers.
"""

from __future__ import annotations

import re
import time

import pytest


def exposure(host, unit: str) -> float:
    out = host.run(f"systemd-analyze security --no-pager {unit}").stdout
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert match, out
    return float(match.group(1))


def mount_options(host, pid: str, mount_point: str) -> str:
    """'<fstype> <options>' of the mount at mount_point in pid's namespace ('' when none)."""
    found = ""
    for line in host.run(f"cat /proc/{pid}/mountinfo").stdout.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[4] == mount_point:
            fstype = fields[fields.index("-") + 1]
            found = f"{fstype} {fields[5]}"  # the last (topmost) mount wins
    return found


def wait_for(predicate, timeout: float = 30.0, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    host = item.funcargs.get("host") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or host is None:
        return
    for unit in getattr(item.module, "UNITS", ()):
        journal = host.run(f"journalctl -u {unit} --no-pager -n 60").stdout
        report.sections.append((f"journalctl -u {unit}", journal))
