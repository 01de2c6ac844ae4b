"""``site.yml`` the way operators run it against a real droplet: over SSH (OpenSSH on port 22,
pipelining, ControlPersist) as the non-root user ``ops`` who becomes root with sudo. The box
was converged over ``podman exec`` (Molecule's converge and idempotence), so this run must
change nothing, and sshd's and sudo's own logs must show that it came in as ``ops``."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import SSH_TIMINGS, Bed, changed, playbook


def test_site_yml_over_ssh_as_a_sudo_user_changes_nothing(
    bed: Bed, ssh_inventories: list[Path]
) -> None:
    name = bed.host.backend.name
    since = bed.run("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    began = time.monotonic()
    proc = playbook(ssh_inventories, name, "site.yml")
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert changed(proc) == 0, proc.stdout[-6000:]
    SSH_TIMINGS.append(f"site.yml no-op over SSH as ops (sudo): {elapsed:.1f} s, changed=0")

    # sshd let ops in by key (a master connection kept by ControlPersist may predate the run)
    logins = bed.run("journalctl -q --no-pager -u ssh").stdout
    assert "Accepted publickey for ops" in logins, logins[-2000:]
    # sudo logs each become: this run's modules ran as root, reached through ops
    sudo = bed.run(f"journalctl -q --no-pager -t sudo --since '{since}'").stdout
    becomes = sudo.count("ops : ") if "USER=root" in sudo else 0
    assert becomes >= 50, sudo[-2000:]
    # ControlPersist: the run's tasks shared one master connection, not one login per task
    recent = bed.run(f"journalctl -q --no-pager -u ssh --since '{since}'").stdout
    assert recent.count("Accepted publickey for ops") <= 3, recent[-2000:]
