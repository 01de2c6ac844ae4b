"""What an operator checks by hand after `smt_webhook` converged, plus one real trigger (runs
before test_b_smt_upload.py: the health check looks at the box before any pass)."""

from __future__ import annotations

import json

import pytest
from role_checks import (
    assert_server_running,
    assert_unit_verifies,
    exposure,
    ingest_invocation,
    mount_options,
    run_http_script,
    ufw_allowed,
    wait_for_pass_after,
)

UNITS = ("smt-webhook.service", "smt-ingest.service", "smt-ingest.path")
SPOOL = "/var/spool/smt-ingest"
ENV_FILE = "/etc/default/smt-webhook"
SECRET = "molecule-WEBHOOK-SECRET-do-not-leak-0123456789"  # noqa: S105 - test value
MAX_EXPOSURE = 3.0

# Runs inside the container: POST /trigger/smt-now, print "<status> <body>".
POST = """
import sys, urllib.request, urllib.error
req = urllib.request.Request("http://127.0.0.1:8787/trigger/smt-now",
                             data=b'{"reason": "molecule"}', method="POST",
                             headers={"content-type": "application/json"})
if len(sys.argv) > 1:
    req.add_header("x-intelliwatt-secret", sys.argv[1])
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def post(host, *args: str) -> tuple[int, str]:
    return run_http_script(host, POST, *args)


def test_server_user_is_unprivileged(host):
    user = host.user("smt-webhook")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert "smt-droplet" in user.groups
    assert "deploy" not in user.groups
    # Least privilege: the webhook cannot read ADMIN_TOKEN (nor its own env file: systemd does).
    assert host.run("sudo -u smt-webhook cat /etc/default/intelliwatt-smt").rc != 0
    assert host.run(f"sudo -u smt-webhook cat {ENV_FILE}").rc != 0


def test_env_file(host):
    f = host.file(ENV_FILE)
    assert (f.user, f.group, f.mode) == ("root", "root", 0o640)
    content = f.content_string
    assert f"INTELLIWATT_WEBHOOK_SECRET={SECRET}\n" in content
    for name in ("SMT_WEBHOOK_PORT=8787", "SMT_WEBHOOK_BIND=", "SMT_SPOOL_DIR=", "SMT_LOCAL_DIR="):
        assert name in content


def test_service_enabled_running_listening(host):
    assert_server_running(host, "smt-webhook.service", "smt-webhook", 8787)
    state = host.file("/var/lib/smt-webhook")  # the replay memory of signed calls
    assert state.is_directory and state.user == "smt-webhook" and state.mode == 0o700


def test_systemd_analyze_verify(host):
    assert_unit_verifies(host, "smt-webhook.service")


@pytest.mark.parametrize("unit", ["smt-webhook.service", "smt-ingest.service"])
def test_security_exposure(host, unit):
    score = exposure(host, unit)
    print(f"systemd-analyze security {unit}: {score}")
    assert score <= MAX_EXPOSURE


def test_ufw_opens_only_ssh_and_the_servers(host):
    assert ufw_allowed(host) == {"22/tcp", "8787/tcp", "8080/tcp"}  # webhook, upload server


HEALTH = """
import json, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:8787/health", timeout=5) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def health(host) -> tuple[int, dict]:
    status, body = run_http_script(host, HEALTH)
    return status, json.loads(body)


def test_health_before_any_pass(host):
    assert not host.file(f"{SPOOL}/status/last-ingest.json").exists  # no pass ran yet
    status, body = health(host)
    assert status == 200, body


def test_trigger_queues_a_pass_that_the_path_unit_starts(host):
    status, body = post(host)
    assert status == 401, body
    status, body = post(host, "wrong-secret")
    assert status == 401, body
    assert not host.file(f"{SPOOL}/queue").listdir()

    before = ingest_invocation(host)
    status, body = post(host, SECRET)
    assert status == 202, body
    reply = json.loads(body)
    assert reply["ok"] is True and reply["queued"] is True

    # smt-ingest.path sees queue/ non-empty and starts the pass, which claims the request first.
    assert wait_for_pass_after(host, before)
    assert not [n for n in host.file(f"{SPOOL}/queue").listdir() if n.endswith(".json")]
    props = host.service("smt-ingest.service").systemd_properties
    assert props["ExecMainStatus"] == "1", props  # no SFTP/web app here: retry later
    assert host.service("smt-ingest.path").is_running  # no trigger-limit loop
    # The failed pass is what /health reports now, without saying why to a caller with no token.
    status, body = health(host)
    assert status == 503 and body["reason"] == "the droplet needs attention", body


def test_sandbox_of_the_running_server(host):
    """The running server sees / read-only, an empty /home with only the inbox bound (ro)."""
    pid = host.service("smt-webhook.service").systemd_properties["MainPID"]
    assert " ro" in mount_options(host, pid, "/"), "ProtectSystem=strict not applied"
    assert mount_options(host, pid, "/home").startswith("tmpfs ")  # ProtectHome=tmpfs
    assert mount_options(host, pid, "/home/deploy/smt_inbox").split()[1].startswith("ro")
    assert mount_options(host, pid, "/var/spool/smt-ingest").split()[1].startswith("rw")
