"""After ``playbooks/migrate.yml`` took the seed droplet over (molecule/takeover/seed.yml):
nothing of the seed runs or can run again, the inbox and the ledger were kept, and the first
pass posts exactly the files the seed's ledger lacks, once each, with their ESIIDs."""

from __future__ import annotations

import re
from typing import Any

from conftest import Bed

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


def _listener_units(bed: Bed, port: int) -> set[str]:
    out = bed.run("ss -Htlnp").stdout
    pids = {
        int(pid)
        for line in out.splitlines()
        if re.search(rf":{port}\s", line)
        for pid in re.findall(r"pid=(\d+)", line)
    }
    units = set()
    for pid in pids:
        cgroup = bed.run(f"cat /proc/{pid}/cgroup").stdout
        units.add(cgroup.strip().rsplit("/", 1)[-1])
    return units


def test_the_seed_units_are_replaced_by_ours(host: Any) -> None:
    unit = host.file("/etc/systemd/system/smt-ingest.service").content_string
    assert "Ansible managed" in unit and "Type=oneshot" in unit
    assert not re.search(r"^Restart=always", unit, re.M)
    timer = host.file("/etc/systemd/system/smt-ingest.timer").content_string
    assert "OnCalendar=" in timer and "OnUnitActiveSec" not in timer
    upload = host.file("/etc/systemd/system/smt-upload-server.service").content_string
    assert "Ansible managed" in upload and "http.server" not in upload


def test_the_hand_started_webhook_is_gone_and_ours_holds_the_port(bed: Bed, host: Any) -> None:
    assert host.run("pgrep -f 'http.server 8787'").rc == 1
    assert host.run("pgrep -f 'http.server 8080'").rc == 1
    assert _listener_units(bed, 8787) == {"smt-webhook.service"}
    assert _listener_units(bed, 8080) == {"smt-upload-server.service"}
    listening = bed.run("ss -Htln").stdout
    for port in (8787, 8080):  # loopback only, behind the TLS front
        assert re.search(rf"127\.0\.0\.1:{port}\s", listening), listening


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
    # Our ingest service is a oneshot started by our timer and path unit, never enabled itself.
    assert not host.service("smt-ingest.service").is_enabled
    assert host.service("smt-ingest.timer").is_enabled
    assert host.service("smt-ingest.path").is_enabled
    assert host.run("pgrep -f fetch_and_post").rc == 1
