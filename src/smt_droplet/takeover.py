"""What a hand-built seed droplet runs, before ``playbooks/migrate.yml`` takes it over
(the ``smt_seed_survey`` module is a thin wrapper around :func:`survey`).

* **Units**: each of the droplet's unit names whose file exists and was not written by Ansible
  (no ``Ansible managed`` header): enabled/active state, and the seed's known faults
  (``Restart=always`` on the ingest, a monotonic timer).
* **Listeners**: the processes listening on the seed's ports (8080, 8787), found through
  ``/proc/net/tcp*`` and ``/proc/PID/fd``; a process outside any ``.service`` cgroup was started
  by hand (``nohup``) and is stopped by PID.
* **Settings**: the seed's env file, read leniently (quotes, ``export`` lines, CRLF), compared
  key by key with what the inventory gives; a secret that differs is named, never shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .envfile import SECRET_SETTINGS, EnvFileError, read_env_file

MANAGED_MARKER = "Ansible managed"
SEED_UNITS = (
    "smt-ingest.timer",
    "smt-ingest.service",
    "smt-upload-server.service",
    "smt-webhook.service",
)
SEED_PORTS = (8080, 8787)
_LISTEN = "0A"


@dataclass
class LegacyUnit:
    unit: str
    path: str
    enabled: bool
    active: bool
    faults: list[str] = field(default_factory=list)


@dataclass
class Listener:
    port: int
    pid: int
    command: str
    unit: str | None  # the .service whose cgroup holds it; None: started by hand


@dataclass
class Survey:
    units: list[LegacyUnit] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    env_found: bool = False
    env_keys: list[str] = field(default_factory=list)
    differences: list[dict[str, str]] = field(default_factory=list)
    env_error: str | None = None

    @property
    def hand_started(self) -> list[Listener]:
        return [lst for lst in self.listeners if lst.unit is None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hand_started"] = [asdict(lst) for lst in self.hand_started]
        return data


def survey(
    *,
    env_file: Path,
    expected: Mapping[str, str],
    units: Iterable[str] = SEED_UNITS,
    ports: Iterable[int] = SEED_PORTS,
    unit_dir: Path = Path("/etc/systemd/system"),
    proc: Path = Path("/proc"),
    unit_state: Any = None,
) -> tuple[Survey, dict[str, str]]:
    """The survey, plus the seed's settings (for adoption; they hold secrets: never log them)."""
    result = Survey()
    for unit in units:
        legacy = _legacy_unit(unit_dir / unit, unit_state)
        if legacy is not None:
            result.units.append(legacy)
    result.listeners = listeners(set(ports), proc)
    seed: dict[str, str] = {}
    if env_file.exists():
        result.env_found = True
        try:
            seed = read_env_file(env_file, shell_export=True)
        except EnvFileError as exc:
            result.env_error = str(exc)
        result.env_keys = sorted(seed)
        result.differences = differences(seed, expected)
    return result, seed


def differences(seed: Mapping[str, str], expected: Mapping[str, str]) -> list[dict[str, str]]:
    """Keys the box sets to something else than the inventory (secrets masked)."""
    out = []
    for key, wanted in sorted(expected.items()):
        if key not in seed or wanted in (None, "") or seed[key] == str(wanted):
            continue
        if key in SECRET_SETTINGS:
            out.append({"key": key, "box": "(a different secret)", "inventory": "(vaulted)"})
        else:
            out.append({"key": key, "box": seed[key], "inventory": str(wanted)})
    return out


def _legacy_unit(path: Path, unit_state: Any) -> LegacyUnit | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    if MANAGED_MARKER in text:
        return None
    enabled, active = unit_state(path.name) if unit_state is not None else (False, False)
    faults = []
    if re.search(r"^\s*Restart\s*=\s*always", text, re.M) and path.name.startswith("smt-ingest"):
        faults.append("Restart=always on a short-lived pass (it loops)")
    if re.search(r"^\s*OnUnitActiveSec\s*=", text, re.M):
        faults.append("monotonic timer (no catch-up after downtime)")
    return LegacyUnit(path.name, str(path), enabled, active, faults)


def listeners(ports: set[int], proc: Path = Path("/proc")) -> list[Listener]:
    """Processes listening on ``ports`` (TCP, IPv4 and IPv6)."""
    inodes: dict[str, int] = {}
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    inodes[fields[9]] = port
    found: dict[tuple[int, int], Listener] = {}
    if not inodes:
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and match.group(1) in inodes:
                port, pid = inodes[match.group(1)], int(entry.name)
                found[(port, pid)] = Listener(port, pid, _command(entry), _unit_of(entry))
    return sorted(found.values(), key=lambda lst: (lst.port, lst.pid))


def _command(entry: Path) -> str:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]


def _unit_of(entry: Path) -> str | None:
    try:
        cgroup = (entry / "cgroup").read_text()
    except OSError:
        return None
    for line in cgroup.splitlines():
        path = line.rsplit(":", 1)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None
