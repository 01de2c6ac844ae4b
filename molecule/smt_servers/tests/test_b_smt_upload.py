"""What an operator checks by hand after `smt_upload` converged, plus one real upload."""

from __future__ import annotations

import json
import re

import pytest
from role_checks import (
    assert_server_running,
    assert_unit_verifies,
    exposure,
    ingest_invocation,
    mount_options,
    run_http_script,
    wait_for_pass_after,
)

UNITS = ("smt-upload-server.service", "smt-ingest.service", "smt-ingest.path")
INBOX = "/home/deploy/smt_inbox"
SPOOL = "/var/spool/smt-ingest"
ENV_FILE = "/etc/default/smt-upload-server"
TOKEN = "molecule-UPLOAD-TOKEN-do-not-leak-0123456789"  # noqa: S105 - test value
MAX_EXPOSURE = 3.0

# Runs inside the container: multipart POST /upload of a small SMT CSV, print "<status> <body>".
POST = """
import sys, uuid, urllib.request, urllib.error
csv = (b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,"
       b"ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION\\r\\n"
       b"'10443720000000099,1/1/2026,1/2/2026,00:00,00:15,0.25,A,Consumption\\r\\n")
boundary = uuid.uuid4().hex
body = (f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"file\\"; "
        f"filename=\\"10443720000000099_molecule.csv\\"\\r\\nContent-Type: text/csv\\r\\n\\r\\n"
        ).encode() + csv + f"\\r\\n--{boundary}--\\r\\n".encode()
req = urllib.request.Request("http://127.0.0.1:8080/upload", data=body, method="POST",
    headers={"content-type": f"multipart/form-data; boundary={boundary}",
             "x-smt-upload-role": "admin"})
if len(sys.argv) > 1:
    req.add_header("x-smt-upload-token", sys.argv[1])
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def post(host, *args: str) -> tuple[int, str]:
    return run_http_script(host, POST, *args)


def csv_files(host) -> list[str]:
    return sorted(n for n in host.file(INBOX).listdir() if n.endswith(".csv"))


def test_server_user_is_unprivileged(host):
    user = host.user("smt-upload")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert "smt-droplet" in user.groups
    assert "deploy" not in user.groups
    assert host.run("sudo -u smt-upload cat /etc/default/intelliwatt-smt").rc != 0
    assert host.run(f"sudo -u smt-upload cat {ENV_FILE}").rc != 0


def test_env_file(host):
    f = host.file(ENV_FILE)
    assert (f.user, f.group, f.mode) == ("root", "root", 0o640)
    content = f.content_string
    assert f"SMT_UPLOAD_TOKEN={TOKEN}\n" in content
    for line in (
        "SMT_UPLOAD_PORT=8080",
        "SMT_ADMIN_UPLOAD_DAILY_LIMIT=50",
        "SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT=5",
        "SMT_UPLOAD_STATE=/var/lib/smt-upload/",
        f"SMT_LOCAL_DIR={INBOX}",
        f"SMT_SPOOL_DIR={SPOOL}",
        f"STATE_FILE={INBOX}/.posted_sha256",
    ):
        assert line in content
    assert not re.search(r"^ADMIN_TOKEN=", content, re.M)


def test_service_enabled_running_listening(host):
    assert_server_running(host, "smt-upload-server.service", "smt-upload", 8080)
    state = host.file("/var/lib/smt-upload")
    assert state.is_directory and state.user == "smt-upload" and state.mode == 0o700


def test_systemd_analyze_verify(host):
    assert_unit_verifies(host, "smt-upload-server.service")


@pytest.mark.parametrize("unit", ["smt-upload-server.service", "smt-ingest.service"])
def test_security_exposure(host, unit):
    score = exposure(host, unit)
    print(f"systemd-analyze security {unit}: {score}")
    assert score <= MAX_EXPOSURE


def test_upload_lands_in_inbox_and_queues_a_pass(host):
    before_files = csv_files(host)
    status, body = post(host)
    assert status == 401, body
    status, body = post(host, "wrong-token")
    assert status == 401, body
    assert csv_files(host) == before_files  # rejected before a byte was written

    before = ingest_invocation(host)
    status, body = post(host, TOKEN)
    assert status == 202, body
    reply = json.loads(body)
    assert reply["ok"] is True and reply["stored"] is True and reply["queued"] is True

    new = [n for n in csv_files(host) if n not in before_files]
    assert len(new) == 1 and new[0].endswith("10443720000000099_molecule.csv"), new
    stored = host.file(f"{INBOX}/{new[0]}")
    # Written by smt-upload, group from the setgid inbox, readable by the ingest user.
    assert (stored.user, stored.group, stored.mode) == ("smt-upload", "smt-droplet", 0o660)
    assert host.run(f"sudo -u deploy head -c1 {INBOX}/{new[0]}").rc == 0
    assert host.file("/var/lib/smt-upload").listdir()  # the limiter's state is on disk

    assert wait_for_pass_after(host, before)
    assert not [n for n in host.file(f"{SPOOL}/queue").listdir() if n.endswith(".json")]


def test_sandbox_of_the_running_server(host):
    """The running server sees / read-only, an empty /home with only the inbox bound (rw)."""
    pid = host.service("smt-upload-server.service").systemd_properties["MainPID"]
    assert " ro" in mount_options(host, pid, "/"), "ProtectSystem=strict not applied"
    assert mount_options(host, pid, "/home").startswith("tmpfs ")  # ProtectHome=tmpfs
    assert mount_options(host, pid, "/home/deploy/smt_inbox").split()[1].startswith("rw")
    assert mount_options(host, pid, "/var/spool/smt-ingest").split()[1].startswith("rw")
