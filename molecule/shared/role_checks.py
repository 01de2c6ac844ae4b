"""Checks shared by the role scenarios' testinfra tests (smt_ingest, smt_webhook, smt_upload).

Each scenario's ``tests/conftest.py`` puts this directory on ``sys.path`` and re-exports the
report hook; the test modules import the helpers.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

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


def converge_with_tags(*tags: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the scenario's converge.yml again with only ``tags`` (from the verifier, which runs
    on the controller): what an operator's ``ansible-playbook site.yml --tags ...`` does."""
    scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
    project = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(project / "roles"),
        "ANSIBLE_LIBRARY": str(project / "library"),
        "ANSIBLE_MODULE_UTILS": str(project / "src"),
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    cmd = [
        "ansible-playbook",
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        str(scenario / "converge.yml"),
        "--tags",
        ",".join(tags),
    ]
    if check:
        cmd.append("--check")
    return subprocess.run(
        cmd, cwd=scenario, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def recap_changed(stdout: str) -> list[int]:
    """The changed= counts of a play recap."""
    return [int(n) for n in re.findall(r"\bchanged=(\d+)", stdout)]
