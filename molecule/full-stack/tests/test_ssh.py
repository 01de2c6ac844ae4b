"""The README's "Provisioning a real droplet" steps, run literally against the converged
droplet the way an operator runs them: over SSH (OpenSSH on port 22, pipelining,
ControlPersist) as the non-root user ``ops`` who becomes root with sudo, with the inventory
copied from ``inventory/`` and the secrets in an ``ansible-vault``-encrypted ``vault.yml``.

What the container does not allow is said where it is replaced: ``--ask-vault-pass`` reads a
terminal, so the password comes from a file (``--vault-password-file``); ``$EDITOR`` and the
``ssh-keyscan`` of SMT's host are the test writing the test bed's values; the droplet's own
SSH key and host key come from molecule/testbed/ssh-access.yml. The box was converged over
``podman exec`` (Molecule's converge and idempotence), so ``site.yml`` must change nothing, and
sshd's and sudo's own logs must show that it came in as ``ops``."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SSH_TIMINGS, TESTBED_VARS, Bed, changed

sys.path.insert(0, str(REPO))
from testbed.smt_csv import default_filename, generate_interval_csv

VAULT_PASSWORD = "readme-test-vault-password"  # noqa: S105 (a throwaway vault of test secrets)
# vars.yml's secrets (the example maps each onto a vault_* variable) and the test bed's values.
SECRETS = {
    "vault_smt_ingest_admin_token": "smt_testbed_admin_token",
    "vault_smt_webhook_secret": "smt_testbed_webhook_secret",
    "vault_smt_upload_token": "smt_testbed_upload_token",
    "vault_smt_upload_ticket_secret": "smt_testbed_ticket_secret",
}


def readme_commands() -> list[str]:
    """The commands of the README's provisioning section, in order: the shell lines of its code
    blocks that copy, encrypt or run a playbook (comments cut), and the inline upload-csv.yml
    command."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Provisioning a real droplet", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line.startswith(("cp ", "ansible-vault ", "ansible-playbook ")):
                commands.append(line)
    upload = re.search(r"`(ansible-playbook playbooks/upload-csv\.yml\s[^`]*)`", section)
    assert upload, "the README no longer shows upload-csv.yml"
    commands.append(" ".join(upload.group(1).split()))
    return commands


def operator_checkout(tmp_path: Path) -> Path:
    """A checkout as the operator has it: the repository's files, its own ``inventory/``."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("playbooks", "roles", "library", "src"):
        (work / name).symlink_to(REPO / name)
    # copies: ansible.cfg's relative paths are taken from where it lies
    shutil.copyfile(REPO / "ansible.cfg", work / "ansible.cfg")
    shutil.copytree(REPO / "inventory", work / "inventory")
    return work


def fill_in_inventory(work: Path, bed: Bed, overlay: Path) -> None:
    """Step 2 (``hosts.yml``: the droplet's address and SSH user) and step 4 (SMT's pinned host
    key) with the test bed's values; the rest of ``vars.yml`` as the example has it, plus what
    points the roles at the test bed inside the container."""
    reach = yaml.safe_load(overlay.read_text(encoding="utf-8"))["all"]["hosts"]
    name, ssh = next(iter(reach.items()))
    hosts_file = work / "inventory" / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text(encoding="utf-8"))
    droplets = hosts["all"]["children"]["smt"]["hosts"]
    assert list(droplets) == ["droplet1"], droplets
    droplet = droplets.pop("droplet1")
    droplet.update({k: v for k, v in ssh.items() if k != "ansible_connection"})
    droplets[name] = droplet
    hosts_file.write_text(yaml.safe_dump(hosts, sort_keys=False), encoding="utf-8")

    vars_file = work / "inventory" / "group_vars" / "smt" / "vars.yml"
    example = yaml.safe_load(vars_file.read_text(encoding="utf-8"))
    testbed = yaml.safe_load(TESTBED_VARS.read_text(encoding="utf-8"))
    refs = {k: v for k, v in example.items() if isinstance(v, str) and "vault_" in v}
    merged: dict[str, Any] = {**example, **testbed, **refs}
    merged.pop("smt_ingest_sftp_private_key_src")  # the key is in the vault, as the README says
    vars_file.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
    assert bed.vars["smt_testbed_double_era"] == merged["smt_testbed_double_era"]


def write_vault(path: Path, bed: Bed) -> None:
    """``$EDITOR vault.yml``: every secret the example holds, replaced by the test bed's."""
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    testbed = Path(os.environ["SMT_TESTBED_DIR"])
    filled = {key: bed.vars[source] for key, source in SECRETS.items()}
    filled["vault_smt_ingest_sftp_private_key"] = (testbed / "id_ed25519").read_text()
    pgp = testbed / "pgp_secret.asc"
    filled["vault_smt_ingest_pgp_private_key"] = (
        pgp.read_text().rstrip("\n") if pgp.is_file() else ""
    )
    assert set(filled) <= set(values), set(values)  # the example names every one of them
    path.write_text(yaml.safe_dump({**values, **filled}, sort_keys=False), encoding="utf-8")


def run(
    work: Path, command: str, password_file: Path, csv: Path
) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command)
    if "--ask-vault-pass" in argv:  # no terminal here: the same password from a file
        argv[argv.index("--ask-vault-pass")] = f"--vault-password-file={password_file}"
    if argv[0] == "ansible-vault":
        argv.insert(2, f"--vault-password-file={password_file}")
    argv = [a.replace("/path/file.csv", str(csv)) for a in argv]
    # An operator's shell: none of Molecule's settings (its ANSIBLE_CONFIG would replace the
    # checkout's ansible.cfg and with it inventory/hosts.yml).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env.update(ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        argv, cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def test_the_readme_provisioning_steps_work_as_written(
    bed: Bed, ssh_inventories: list[Path], tmp_path: Path
) -> None:
    commands = readme_commands()
    playbooks = [c for c in commands if c.startswith("ansible-playbook")]
    assert commands[:2] == [
        "cp inventory/group_vars/smt/vault.yml.example inventory/group_vars/smt/vault.yml",
        "ansible-vault encrypt inventory/group_vars/smt/vault.yml",
    ], commands
    assert [shlex.split(c)[1] for c in playbooks] == [
        "playbooks/site.yml",
        "playbooks/site.yml",
        "playbooks/ingest-now.yml",
        "playbooks/upload-csv.yml",
    ], playbooks
    assert all("--ask-vault-pass" in c for c in playbooks), playbooks

    work = operator_checkout(tmp_path)
    fill_in_inventory(work, bed, ssh_inventories[-1])
    password = tmp_path / "vault-password"
    password.write_text(VAULT_PASSWORD + "\n")
    password.chmod(0o600)
    esiid = "1044372" + str(time.time_ns())[-10:]
    start = date.today() - timedelta(days=30)
    csv = tmp_path / default_filename(esiid, start, 7)
    csv.write_bytes(generate_interval_csv(esiid, start, 7, seed=5))

    name = bed.host.backend.name
    since = bed.run("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    vault = work / "inventory" / "group_vars" / "smt" / "vault.yml"
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    for command in commands:
        began = time.monotonic()
        proc = run(work, command, password, csv)
        elapsed = time.monotonic() - began
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
        if command.startswith("cp "):
            write_vault(vault, bed)  # $EDITOR
        results[command] = proc
        SSH_TIMINGS.append(f"README: {command} ({elapsed:.1f} s)")
    assert vault.read_text().startswith("$ANSIBLE_VAULT;"), "the vault was not encrypted"

    check, first = (results[c] for c in playbooks[:2])
    assert changed(check) == 0, check.stdout[-6000:]  # --check --diff: nothing would change
    assert changed(first) == 0, first.stdout[-6000:]
    assert "DSA is deprecated" not in first.stdout + first.stderr
    ingest, upload = results[playbooks[2]].stdout, results[playbooks[3]].stdout
    assert "TASK [Totals]" in ingest, ingest[-3000:]
    said = " ".join(upload.split())  # the YAML callback folds long messages
    assert re.search(rf"posted {re.escape(csv.name)} .*landed=exact", said), upload[-3000:]

    # sshd let ops in by key (a master connection kept by ControlPersist may predate the run)
    logins = bed.run("journalctl -q --no-pager -u ssh").stdout
    assert "Accepted publickey for ops" in logins, logins[-2000:]
    # sudo logs each become: the modules ran as root, reached through ops
    sudo = bed.run(f"journalctl -q --no-pager -t sudo --since '{since}'").stdout
    becomes = sudo.count("ops : ") if "USER=root" in sudo else 0
    assert becomes >= 50, sudo[-2000:]
    # ControlPersist: the runs shared master connections, not one login per task
    recent = bed.run(f"journalctl -q --no-pager -u ssh --since '{since}'").stdout
    assert recent.count("Accepted publickey for ops") <= 8, recent[-2000:]
    assert name in (work / "inventory" / "hosts.yml").read_text()


@pytest.fixture(autouse=True)
def _no_controller_vault(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs above must not find a vault password somewhere else on the controller."""
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
