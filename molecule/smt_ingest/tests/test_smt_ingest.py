"""What an operator checks by hand after `smt_ingest` converged (no SFTP or web app reachable)."""

from __future__ import annotations

import json
import re
import time

import pytest
from role_checks import (
    assert_unit_verifies,
    converge_with_tags,
    exposure,
    ingest_invocation,
    recap_changed,
    ufw_allowed,
    wait_for_pass_after,
)

UNITS = ("smt-ingest.service", "smt-ingest.timer", "smt-ingest.path")
INBOX = "/home/deploy/smt_inbox"
SPOOL = "/var/spool/smt-ingest"
ENV_FILE = "/etc/default/intelliwatt-smt"
DROPIN = "/etc/systemd/system/smt-ingest.service.d/override.conf"
MAX_EXPOSURE = 3.0


@pytest.mark.parametrize(
    "name", ["python3", "python3-paramiko", "python3-requests", "gnupg", "ufw"]
)
def test_packages(host, name):
    assert host.package(name).is_installed


def test_ingest_user_and_groups(host):
    user = host.user("deploy")
    assert user.exists
    assert user.group == "deploy"
    assert "smt-droplet" in user.groups


@pytest.mark.parametrize(
    "path",
    [INBOX, SPOOL, f"{SPOOL}/tmp", f"{SPOOL}/queue", f"{SPOOL}/processing", f"{SPOOL}/status"],
)
def test_shared_directories_are_setgid(host, path):
    d = host.file(path)
    assert d.is_directory
    assert d.user == "deploy"
    assert d.group == "smt-droplet"
    assert d.mode == 0o2770


def test_env_file(host):
    f = host.file(ENV_FILE)
    assert (f.user, f.group, f.mode) == ("root", "deploy", 0o640)
    content = f.content_string
    for name in (
        "ADMIN_TOKEN",
        "INTELLIWATT_BASE_URL",
        "SMT_HOST",
        "SMT_USER",
        "SMT_KEY",
        "SMT_REMOTE_DIR",
        "SMT_LOCAL_DIR",
        "SOURCE_TAG",
        "METER_DEFAULT",
        "ESIID_DEFAULT",
        "SMT_PORT",
        "SMT_KNOWN_HOSTS",
        "SMT_HOST_KEY_POLICY",
        "SMT_MIN_AGE",
        "SMT_ENCODING",
        "SMT_MAX_BODY_BYTES",
        "SMT_HTTP_TIMEOUT",
        "SMT_SPOOL_DIR",
        "SMT_MIN_FREE_MB",
        "SMT_RETENTION_DAYS",
        "SMT_LEDGER_COPIES",
        "SMT_REMOTE_COMPLETION",
    ):
        assert re.search(rf"^{name}=\S", content, re.M), name
    # STATE_FILE belongs to the drop-in only: EnvironmentFile= would override Environment=.
    assert not re.search(r"^STATE_FILE=", content, re.M)
    assert content.startswith("#")  # ansible_managed header


def test_sftp_key_and_pinned_host_key(host):
    key = host.file("/home/deploy/.ssh/id_smt_sftp")
    assert (key.user, key.mode) == ("deploy", 0o600)
    assert "PRIVATE KEY" in host.run("sudo -u deploy head -1 /home/deploy/.ssh/id_smt_sftp").stdout
    known = host.file("/home/deploy/.ssh/known_hosts_smt")
    assert known.content_string.startswith("[127.0.0.1]:2222 ssh-ed25519 ")
    assert known.mode == 0o644


def test_dropin(host):
    content = host.file(DROPIN).content_string
    assert f"WorkingDirectory={INBOX}\n" in content
    assert f"Environment=STATE_FILE={INBOX}/.posted_sha256\n" in content


def test_runtime_package_installed(host):
    assert host.file("/opt/smt-droplet/smt_droplet/__main__.py").is_file
    assert host.file("/opt/smt-droplet/smt_droplet/page_assets/page.js").is_file  # the page
    assert not host.file("/opt/smt-droplet/smt_droplet/__pycache__").exists
    env = "PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/smt-droplet"
    out = host.run(f"{env} /usr/bin/python3 -m smt_droplet --version")
    assert out.rc == 0, out.stderr
    build = host.file("/opt/smt-droplet/smt_droplet.build").content_string.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{12}", build), build
    assert out.stdout.strip().endswith(f"(build {build})")  # what the play printed as "new"


def test_smt_droplet_command_on_the_path(host):
    """`sudo smt-droplet status` runs the package as deploy with the units' settings."""
    wrapper = host.file("/usr/local/bin/smt-droplet")
    assert (wrapper.user, wrapper.mode) == ("root", 0o755)
    out = host.run("cd /root && PATH=/usr/local/bin:/usr/bin:/bin smt-droplet status --json")
    assert out.rc == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["state_file"] == f"{INBOX}/.posted_sha256"  # the drop-in's STATE_FILE
    assert report["inbox"] == INBOX
    assert host.run("/usr/local/bin/smt-droplet --version").stdout.startswith("smt-droplet")
    refused = host.run(
        "cd /tmp && setpriv --reuid=65534 --regid=65534 --clear-groups "
        "/usr/local/bin/smt-droplet status"
    )
    assert refused.rc == 2 and "run it with sudo" in refused.stderr


def test_timer_and_path_enabled_and_active(host):
    for unit in ("smt-ingest.timer", "smt-ingest.path"):
        service = host.service(unit)
        assert service.is_enabled, unit
        assert service.is_running, unit
    props = host.service("smt-ingest.service").systemd_properties
    assert props["LoadState"] == "loaded"
    assert props["Type"] == "oneshot"
    assert props["Restart"] == "no"
    assert props["User"] == "deploy"
    timer = host.run("systemctl show -p TimersCalendar -p Persistent smt-ingest.timer").stdout
    assert "Persistent=yes" in timer
    assert f"DirectoryNotEmpty={SPOOL}/queue\n" in host.run("systemctl cat smt-ingest.path").stdout


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(host, unit):
    assert_unit_verifies(host, unit)


def test_security_exposure(host):
    score = exposure(host, "smt-ingest.service")
    print(f"systemd-analyze security smt-ingest.service: {score}")
    assert score <= MAX_EXPOSURE


def test_ufw_baseline(host):
    assert ufw_allowed(host) == {"22/tcp"}
    assert "Default: deny (incoming), allow (outgoing)" in host.run("ufw status verbose").stdout


def test_a_queued_request_starts_a_sandboxed_pass(host):
    """The .path unit fires on a queued request; the pass runs under the sandbox, claims the
    request, takes its lock in the inbox and records its result in the spool; with no SFTP and
    no web app it ends with exit 1 (retry later), not a namespace/exec failure."""
    before = ingest_invocation(host)
    request = {"id": "molecule-1", "kind": "cli", "received_at": time.time()}
    cmd = (
        f"sudo -u deploy sh -c \"umask 007; printf '%s' '{json.dumps(request)}' "
        f'> {SPOOL}/tmp/molecule-1.json && mv {SPOOL}/tmp/molecule-1.json {SPOOL}/queue/"'
    )
    assert host.run(cmd).rc == 0

    assert wait_for_pass_after(host, before)
    props = host.service("smt-ingest.service").systemd_properties
    assert props["ExecMainStatus"] == "1", props  # sync/post failed: retry later
    assert host.file(f"{SPOOL}/queue/molecule-1.json").exists is False
    lock = host.file(f"{INBOX}/.posted_sha256.lock")
    assert lock.exists and lock.user == "deploy" and lock.group == "smt-droplet"
    assert host.file(f"{SPOOL}/status/last-ingest.json").exists
    journal = host.run("journalctl -u smt-ingest.service --no-pager -n 50").stdout
    assert "226/NAMESPACE" not in journal and "203/EXEC" not in journal


@pytest.mark.parametrize("tag", ["smt_ingest_configure", "smt_ingest_service"])
def test_a_documented_tag_runs_alone_on_the_converged_box(tag):
    """The README's tags work alone: the facts later phases need and the preflight run under any
    tag, and on a converged box nothing changes."""
    out = converge_with_tags(tag)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert recap_changed(out.stdout) == [0], out.stdout[-2000:]
    assert "Check the platform" in out.stdout  # preflight ran
