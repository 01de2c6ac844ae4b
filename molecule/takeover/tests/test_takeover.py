"""After ``playbooks/migrate.yml`` took the seed droplet over (molecule/takeover/seed.yml):
nothing of the seed runs or can run again, the inbox and the ledger were kept, and the first
pass posts exactly the files the seed's ledger lacks, once each, with their ESIIDs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from conftest import REPO, Bed

INBOX = "/home/deploy/smt_inbox"
LEDGER = f"{INBOX}/.posted_sha256"
SEED_SCRIPT = "/home/deploy/apps/intelliwatt/deploy/smt/fetch_and_post.sh"
# seed.yml: ESIID -> (folder, listed in the seed's ledger)
SEED_FILES = {
    "10443720000000101": ("adhocusage", True),
    "10443720000000102": ("adhocusage", False),
    "10443720000000103": ("EnrollmentReports", True),
    "10443720000000104": ("EnrollmentReports", False),
}


def test_the_seed_units_are_replaced_by_ours(host: Any) -> None:
    unit = host.file("/etc/systemd/system/smt-ingest.service").content_string
    assert "Ansible managed" in unit and "Type=oneshot" in unit
    assert not re.search(r"^Restart=always", unit, re.M)
    timer = host.file("/etc/systemd/system/smt-ingest.timer").content_string
    assert "OnCalendar=" in timer and "OnUnitActiveSec" not in timer
    upload = host.file("/etc/systemd/system/smt-upload-server.service").content_string
    assert "Ansible managed" in upload and "http.server" not in upload


def test_the_hand_started_webhook_is_gone_and_ours_holds_the_port(bed: Bed, host: Any) -> None:
    assert host.run("pgrep -f '[h]ttp.server 8787'").rc == 1  # [h]: not pgrep's own shell
    assert host.run("pgrep -f '[h]ttp.server 8080'").rc == 1
    listening = bed.run("ss -Htln").stdout
    for port in (8787, 8080):  # ours, on loopback behind the TLS front; the seed's 0.0.0.0 gone
        assert re.search(rf"127\.0\.0\.1:{port}\s", listening), listening
        assert not re.search(rf"(0\.0\.0\.0|\*|\[::\]):{port}\s", listening), listening
    assert host.service("smt-webhook.service").is_running
    assert host.service("smt-upload-server.service").is_running


def test_the_firewall_opens_the_tls_front_not_the_seed_ports(bed: Bed) -> None:
    ufw = bed.run("ufw status").stdout
    assert not re.search(r"^(8080|8787)/tcp", ufw, re.M), ufw
    assert re.search(r"^443/tcp", ufw, re.M) and re.search(r"^22/tcp", ufw, re.M), ufw


def test_the_seed_script_cannot_run_and_its_env_file_is_kept_aside(host: Any) -> None:
    script = host.file(SEED_SCRIPT)
    assert script.exists and not script.mode & 0o111
    seed_env = host.file("/etc/default/intelliwatt-smt.seed")
    assert (seed_env.user, seed_env.mode) == ("root", 0o600)
    assert "\r\n" in seed_env.content_string  # the hand-written original, byte for byte
    assert "Ansible managed" in host.file("/etc/default/intelliwatt-smt").content_string


def test_the_first_pass_posts_what_the_seed_ledger_lacks_once_each(bed: Bed, host: Any) -> None:
    ledger_before = set(bed.run(f"cat {LEDGER}").stdout.split())
    files = {}
    for esiid, (folder, in_ledger) in SEED_FILES.items():
        path = bed.run(f"ls {INBOX}/{folder}/IntervalMeterUsage_{esiid}_*.csv").stdout.strip()
        sha = bed.run(f"sha256sum {path}").stdout.split()[0]
        assert (sha in ledger_before) == in_ledger, esiid
        files[esiid] = sha
    bed.run("systemctl start smt-ingest.service")
    bed.run("systemctl start smt-ingest.service")  # a second pass posts nothing again
    for esiid, sha in files.items():
        posts = bed.posts_of(sha)
        if SEED_FILES[esiid][1]:
            assert posts == [], (esiid, posts)  # in the seed's ledger: never posted again
        else:
            assert len(posts) == 1 and posts[0]["esiid"] == esiid, (esiid, posts)
    assert set(bed.run(f"cat {LEDGER}").stdout.split()) >= set(files.values())
    assert not host.file(f"{INBOX}/pgp_tmp.Xy12Ab").exists  # the seed's plaintext scratch
    assert all(bed.posts_of(sha) == [] for sha in ledger_before)


def test_nothing_of_the_seed_is_enabled_or_running(host: Any) -> None:
    assert host.service("smt-ingest.timer").is_enabled
    assert host.service("smt-ingest.path").is_enabled
    assert host.run("pgrep -f '[f]etch_and_post'").rc == 1


def _migrate(inventory: Path, host: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "--limit",
            host,
            *extra,
            str(REPO / "playbooks" / "migrate.yml"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_a_disagreeing_inventory_stops_with_a_diff_or_adopts_the_box(
    bed: Bed, inventory_dir: Path
) -> None:
    """The inventory says another SFTP user than the box runs: migrate.yml stops before changing
    anything and names the setting; with smt_migrate_adopt the box's value wins (a --check run
    then changes nothing)."""
    name = bed.host.backend.name
    host_vars = inventory_dir / "host_vars"
    host_vars.mkdir(exist_ok=True)
    override = host_vars / f"{name}.yml"
    override.write_text("smt_ingest_sftp_user: someone-else\n")
    try:
        refused = _migrate(inventory_dir, name)
        assert refused.returncode != 0
        said = refused.stdout + refused.stderr  # ansible-core prints the failure on stderr
        assert "SMT_USER (box: smtpeer, inventory: someone-else)" in said, said[-3000:]
        assert "smt_migrate_adopt=true" in said
        assert "changed=0" in refused.stdout  # it stopped before changing anything
        adopted = _migrate(inventory_dir, name, "--check", "-e", "smt_migrate_adopt=true")
        assert adopted.returncode == 0, adopted.stdout[-4000:]
        assert sum(int(n) for n in re.findall(r"\bchanged=(\d+)", adopted.stdout)) == 0, (
            adopted.stdout[-4000:]
        )
    finally:
        override.unlink()
    env_file = bed.run("cat /etc/default/intelliwatt-smt").stdout
    assert "SMT_USER=smtpeer" in env_file
