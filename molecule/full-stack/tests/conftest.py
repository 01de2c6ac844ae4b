"""Helpers for the full-stack checks: the droplet container runs the SFTP peer and the
IntelliWatt double on its loopback (molecule/testbed/peers.yml); everything here reaches them
through ``podman exec`` (testinfra's podman backend), as a user on the box would."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
TESTBED_VARS = REPO / "molecule" / "testbed" / "group_vars" / "all.yml"
UNITS = (
    "smt-ingest.service",
    "smt-ingest.path",
    "smt-ingest.timer",
    "smt-webhook.service",
    "smt-upload-server.service",
)
SECURITY_SCORES: list[str] = []
SSH_TIMINGS: list[str] = []
T = TypeVar("T")


def testbed_vars() -> dict[str, Any]:
    """The literal ``smt_testbed_*`` values (secrets, ports) the roles were given."""
    data = yaml.safe_load(TESTBED_VARS.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k.startswith("smt_testbed_")}


@dataclass(frozen=True)
class PlacedFile:
    """A CSV placed on the SFTP peer (or uploaded)."""

    path: str
    name: str
    esiid: str
    sha256: str


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class Bed:
    """The test bed inside the droplet container."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.vars = testbed_vars()
        self.root = self.vars["smt_testbed_root"]
        self.remote_dir = f"{self.root}/sftp/root"
        self.double_url = f"http://127.0.0.1:{self.vars['smt_testbed_double_port']}"

    def run(self, command: str) -> Any:
        result = self.host.run(command)
        assert result.rc == 0, f"{command!r} -> rc {result.rc}: {result.stderr or result.stdout}"
        return result

    def make_csv(self, directory: str, days: int = 7) -> PlacedFile:
        """Write a fresh synthetic SMT CSV (random 17-digit ESIID) into ``directory``."""
        esiid = "1044372" + "".join(secrets.choice("0123456789") for _ in range(10))
        seed = secrets.randbelow(1_000_000)
        self.run(
            f"python3 /opt/smt-testbed/smt_csv.py --esiid {esiid} --seed {seed} "
            f"--days {days} --out {shlex.quote(directory)}"
        )
        out = self.run(
            f"ls -t {shlex.quote(directory)}/IntervalMeterUsage_{esiid}_*.csv | head -n 1"
        )
        path = out.stdout.strip()
        sha = self.run(f"sha256sum {shlex.quote(path)}").stdout.split()[0]
        self.run(f"chmod 0644 {shlex.quote(path)}")
        return PlacedFile(path=path, name=path.rsplit("/", 1)[1], esiid=esiid, sha256=sha)

    def place_on_peer(self) -> PlacedFile:
        return self.make_csv(self.remote_dir)

    def http(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        file: str | None = None,
    ) -> HttpAnswer:
        args = ["python3", "/opt/smt-testbed/probe.py", method, url]
        if url.startswith("https://"):
            args += ["--cacert", "/etc/smt-droplet/tls-ca.crt"]  # the front's internal CA
        for name, value in (headers or {}).items():
            args += ["--header", f"{name}: {value}"]
        if json_body is not None:
            args += ["--json", json.dumps(json_body)]
        if file is not None:
            args += ["--file", file]
        result = self.host.run(shlex.join(args))
        answer = json.loads(result.stdout)
        assert result.rc == 0, f"{method} {url}: {answer.get('error')}"
        return HttpAnswer(status=answer["status"], body=answer["body"])

    def received(self) -> list[dict[str, Any]]:
        """Every upload the double accepted (duplicates included), oldest first."""
        answer = self.http("get", f"{self.double_url}/__double/received")
        assert answer.status == 200, answer
        return answer.json()["received"]

    def double_requests(self, filename: str) -> list[dict[str, Any]]:
        """The double's log of upload requests whose file name starts with ``filename``."""
        answer = self.http("get", f"{self.double_url}/__double/received")
        assert answer.status == 200, answer
        return [r for r in answer.json()["received"] if r["filename"].startswith(filename)]

    def posts_of(self, sha256: str) -> list[dict[str, Any]]:
        return [r for r in self.received() if r["sha256"] == sha256]

    def wait_posted(self, placed: PlacedFile, timeout: float = 90.0) -> dict[str, Any]:
        return wait_for(
            lambda: (self.posts_of(placed.sha256) or [None])[0],
            timeout,
            f"{placed.name} (sha256 {placed.sha256[:12]}) posted to the double",
        )

    def spool_depth(self) -> int:
        """Requests queued or being served (``queue/`` and ``processing/`` of the spool)."""
        out = self.host.run(
            "find /var/spool/smt-ingest/queue /var/spool/smt-ingest/processing -type f | wc -l"
        )
        return int(out.stdout.strip() or 0)

    def ingest_invocation(self) -> str:
        """systemd's InvocationID of the last smt-ingest.service run (changes on every start)."""
        return self.run("systemctl show -p InvocationID --value smt-ingest.service").stdout.strip()

    def journal(self, units: tuple[str, ...] = UNITS, lines: int = 80) -> str:
        flags = " ".join(f"-u {shlex.quote(u)}" for u in units)
        out = self.host.run(f"journalctl --no-pager -o short-precise -n {lines} {flags}")
        return out.stdout + out.stderr


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for: {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def bed(host: Any) -> Iterator[Bed]:
    yield Bed(host)


@pytest.fixture(scope="module")
def inventory_dir() -> Path:
    """The inventory that reaches the container: Molecule's (it holds the linked test bed
    group_vars) or ``SMT_TEST_INVENTORY`` (e.g. molecule/testbed/demo-inventory.yml)."""
    explicit = os.environ.get("SMT_TEST_INVENTORY")
    if explicit:
        return Path(explicit)
    ephemeral = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    if not ephemeral:
        pytest.skip("needs Molecule's inventory (molecule verify) or SMT_TEST_INVENTORY")
    return Path(ephemeral) / "inventory"


@pytest.fixture(scope="module")
def ssh_inventories(inventory_dir: Path) -> list[Path]:
    """Molecule's inventory and, after it, the overlay molecule/testbed/ssh-access.yml wrote:
    the same host reached over SSH (port 22, user ``ops``, sudo to root, pipelining and
    ControlPersist), the way operators run ``site.yml`` against a real droplet."""
    testbed = os.environ.get("SMT_TESTBED_DIR")
    overlay = Path(testbed) / "ssh-inventory.yml" if testbed else None
    if overlay is None or not overlay.is_file():
        pytest.skip("needs the SSH overlay of molecule/testbed/ssh-access.yml (full-stack prepare)")
    return [inventory_dir, overlay]


def playbook(
    inventories: Path | list[Path], host: str, name: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook playbooks/NAME`` from the repository root against ``host``."""
    sources = inventories if isinstance(inventories, list) else [inventories]
    env = dict(os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    cmd = ["ansible-playbook", *(f"--inventory={p}" for p in sources), "--limit", host, *extra]
    return subprocess.run(
        [*cmd, str(REPO / "playbooks" / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def changed(proc: subprocess.CompletedProcess[str]) -> int:
    """The sum of ``changed=`` over the play recap."""
    counts = [int(n) for n in re.findall(r"\bchanged=(\d+)", proc.stdout)]
    assert counts, proc.stdout[-3000:]
    return sum(counts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failed check, attach the units' journal so the log says why."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        host = getattr(item, "funcargs", {}).get("host")
        if host is not None:
            text = Bed(host).journal()
            report.sections.append(("journalctl -u smt-*", text))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SECURITY_SCORES:
        terminalreporter.section("systemd-analyze security (for the record)")
        for line in SECURITY_SCORES:
            terminalreporter.write_line(line)
    if SSH_TIMINGS:
        terminalreporter.section("site.yml over SSH (for the record)")
        for line in SSH_TIMINGS:
            terminalreporter.write_line(line)
