"""On a failed check, attach the journal of the units the test module names (``UNITS``)."""

from __future__ import annotations

import pytest


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
