"""Checks shared by the role scenarios' testinfra tests (smt_ingest, smt_servers).

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


# -- checks the server scenarios share ------------------------------------------------------


def assert_server_running(host, unit: str, user: str, port: int) -> dict:
    """Enabled, active, as its own user with UMask 0007, listening on ``port``; its properties."""
    service = host.service(unit)
    assert service.is_enabled and service.is_running, unit
    props = service.systemd_properties
    assert props["User"] == user and props["UMask"] == "0007", props
    assert host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert host.run(f"ps -o user= -p {props['MainPID']}").stdout.strip() == user
    return props


def assert_unit_verifies(host, unit: str) -> None:
    out = host.run(f"systemd-analyze verify /etc/systemd/system/{unit}")
    assert out.rc == 0, out.stderr
    assert unit not in out.stderr, out.stderr


def run_http_script(host, script: str, *args: str) -> tuple[int, str]:
    """Run a python3 script inside the container that prints ``<status> <body>``."""
    out = host.run("python3 -c %s" + " %s" * len(args), script, *args)
    assert out.rc == 0, out.stderr
    status, _, body = out.stdout.strip().partition(" ")
    return int(status), body


def ufw_allowed(host) -> set[str]:
    """The ports UFW allows in (``22/tcp``, ...); UFW must be active."""
    out = host.run("ufw status verbose").stdout
    assert "Status: active" in out, out
    return set(re.findall(r"^(\S+)\s+(?:\(v6\)\s+)?ALLOW IN", out, re.M))


def ingest_invocation(host) -> str:
    """The current InvocationID of smt-ingest.service (after clearing a failed state)."""
    host.run("systemctl reset-failed smt-ingest.service")
    return host.service("smt-ingest.service").systemd_properties.get("InvocationID", "")


def wait_for_pass_after(host, before: str, timeout: float = 90.0) -> bool:
    """Whether smt-ingest.service ran (a new invocation that has finished) after ``before``."""

    def ran() -> bool:
        props = host.service("smt-ingest.service").systemd_properties
        return props.get("InvocationID", "") not in ("", before) and props["ActiveState"] in (
            "failed",
            "inactive",
        )

    return wait_for(ran, timeout=timeout)
