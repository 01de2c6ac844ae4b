"""The test bed itself: the web-app double is strict, the SFTP peer is real, the CSVs look real."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from helpers import REPO

from testbed.intelliwatt_double import PULL_PATH, RAW_UPLOAD_PATH, IntelliWattDouble
from testbed.sftp_peer import SftpPeer, SftpPeerError, _find_tool
from testbed.smt_csv import (
    HEADER,
    dst_fall_back,
    dst_spring_forward,
    generate_interval_csv,
    random_esiid,
    shared_fixture,
)

ESIID = "10443720000000099"
CSV = b"ESIID,USAGE_DATE\n'10443720000000099,11/1/2024\n"


def inline_body(content: bytes = CSV, encoding: str = "base64+gzip", **over: Any) -> dict:
    raw = gzip.compress(content) if encoding == "base64+gzip" else content
    body: dict[str, Any] = {
        "mode": "inline",
        "source": "adhocusage",
        "filename": "IntervalMeterUsage_10443720000000099_20251101.csv",
        "mime": "text/csv",
        "encoding": encoding,
        "content_b64": base64.b64encode(raw).decode(),
        "sizeBytes": len(content),
        "esiid": ESIID,
        "meter": "M1",
        "captured_at": "2025-11-01T06:00:00Z",
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def post(
    webapp: IntelliWattDouble,
    body: Any,
    token: str | None = "default",
    content_type: str = "application/json",
    timeout: float = 10,
) -> requests.Response:
    headers = {"content-type": content_type}
    if token == "default":
        token = webapp.admin_token
    if token is not None:
        headers["x-admin-token"] = token
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(webapp.url + PULL_PATH, data=data, headers=headers, timeout=timeout)


# -- the web-app double: success path -----------------------------------------------------------


def test_inline_gzip_upload_is_accepted_with_every_contract_field(webapp):
    resp = post(webapp, inline_body())
    assert resp.status_code == 200
    data = resp.json()
    expected_keys = {
        "ok", "mode", "filename", "mime", "source", "esiid", "meter", "captured_at",
        "sizeBytes", "sha256", "storagePath", "persisted", "duplicate", "encoding", "id",
        "message",
    }  # fmt: skip
    assert set(data) == expected_keys
    assert data["ok"] is True and data["mode"] == "inline"
    assert data["sha256"] == hashlib.sha256(CSV).hexdigest()  # over decompressed bytes
    assert data["sizeBytes"] == len(CSV)
    assert isinstance(data["id"], str)
    assert (data["persisted"], data["duplicate"]) == (True, False)
    assert data["encoding"] == "base64+gzip" and data["esiid"] == ESIID and data["meter"] == "M1"
    [rec] = webapp.received()
    assert rec["content"] == CSV
    assert rec["filename"] == data["filename"] and rec["captured_at"] == "2025-11-01T06:00:00Z"
    assert rec["body_bytes"] == len(resp.request.body)
    assert webapp.posted() == webapp.received()


def test_same_sha256_again_is_200_duplicate_not_persisted(webapp):
    first = post(webapp, inline_body()).json()
    again = post(webapp, inline_body(encoding="base64", filename="renamed.csv"))
    assert again.status_code == 200
    data = again.json()
    assert (data["duplicate"], data["persisted"]) == (True, False)
    assert data["id"] == first["id"] and data["sha256"] == first["sha256"]
    assert [r["duplicate"] for r in webapp.received()] == [False, True]
    assert len(webapp.posted()) == 1


def test_plain_base64_defaults_and_apostrophe_esiid(webapp):
    body = inline_body(encoding="base64", esiid=f"'{ESIID}'", filename="/\\x.csv")
    del body["encoding"], body["mime"], body["source"], body["sizeBytes"]
    data = post(webapp, body).json()
    assert data["ok"] is True
    assert data["encoding"] == "base64" and data["mime"] == "text/csv"
    assert data["source"] == "adhocusage" and data["esiid"] == ESIID
    assert data["filename"] == "x.csv"  # leading / and \ stripped


# -- the web-app double: every error code ------------------------------------------------------


def test_missing_or_wrong_token_is_401_without_ok_key(webapp):
    for token in (None, "wrong", webapp.admin_token + "x"):
        resp = post(webapp, inline_body(), token=token)
        assert resp.status_code == 401
        assert resp.json() == {"error": "Unauthorized"}
    assert webapp.received() == []


def test_no_configured_token_is_503():
    with IntelliWattDouble(admin_token=None) as double:
        resp = post(double, inline_body(), token="anything")
        assert resp.status_code == 503
        assert resp.json() == {"error": "ADMIN_TOKEN not configured"}


@pytest.mark.parametrize(
    ("override", "content_type", "code"),
    [
        ({}, "text/plain", "EXPECTED_JSON"),
        ({"content_b64": _DROP}, "application/json", "INLINE_MISSING_B64"),
        ({"content_b64": ""}, "application/json", "INLINE_MISSING_B64"),
        ({"encoding": "gzip"}, "application/json", "INLINE_UNSUPPORTED_ENCODING"),
        ({"filename": ""}, "application/json", "INLINE_MISSING_FILENAME"),
        ({"filename": "//"}, "application/json", "INLINE_MISSING_FILENAME"),
        ({"filename": _DROP}, "application/json", "INLINE_MISSING_FILENAME"),
        ({"esiid": _DROP}, "application/json", "MISSING_ESIID"),
        ({"esiid": "104437200000000991"}, "application/json", "MISSING_ESIID"),  # 18 digits
        ({"esiid": "1044372000000009"}, "application/json", "MISSING_ESIID"),  # 16 digits
        ({"esiid": "''10443720000000099"}, "application/json", "MISSING_ESIID"),
        ({"esiid": 10443720000000099}, "application/json", "MISSING_ESIID"),  # not a string
    ],
)
def test_contract_400_codes(webapp, override, content_type, code):
    resp = post(webapp, inline_body(**override), content_type=content_type)
    assert resp.status_code == 400
    assert resp.json()["ok"] is False
    assert resp.json()["error"] == code
    assert webapp.received() == []
    assert webapp.requests()[-1]["error"] == code


def test_bad_json_and_non_object(webapp):
    for raw in ("{not json", "[1, 2]", b"\xff\xfe"):
        resp = post(webapp, raw)
        assert (resp.status_code, resp.json()["error"]) == (400, "BAD_JSON")


def test_size_mismatch_reports_expected_and_actual(webapp):
    resp = post(webapp, inline_body(sizeBytes=len(CSV) + 1))
    assert resp.status_code == 400
    # sizeBytes is of the decompressed bytes, so the compressed length is wrong too
    assert resp.json() == {
        "ok": False,
        "error": "INLINE_SIZE_MISMATCH",
        "expected": len(CSV) + 1,
        "actual": len(CSV),
    }
    compressed = len(gzip.compress(CSV))
    resp = post(webapp, inline_body(sizeBytes=compressed))
    assert resp.json()["error"] == "INLINE_SIZE_MISMATCH"


@pytest.mark.parametrize("mode", [_DROP, "pull", None, "INLINE"])
def test_non_inline_mode_is_a_loud_pull_trigger(webapp, mode):
    resp = post(webapp, inline_body(mode=mode))
    assert resp.status_code == 400
    assert resp.json()["error"] == "NOT_INLINE_TEST_DOUBLE"
    assert len(webapp.pull_triggers()) == 1
    assert webapp.received() == []


@pytest.mark.parametrize(
    "content_b64",
    [
        base64.b64encode(b"this is not gzip").decode(),
        base64.b64encode(gzip.compress(CSV)[:-6]).decode(),  # truncated gzip
        "!!not base64!!",
    ],
)
def test_corrupt_payload_is_500_persist_failed(webapp, content_b64):
    resp = post(webapp, inline_body(content_b64=content_b64, sizeBytes=_DROP))
    assert resp.status_code == 500
    assert resp.json()["error"] == "INLINE_PERSIST_FAILED"
    assert resp.json()["ok"] is False and resp.json()["detail"]
    assert webapp.received() == []


def test_body_over_cap_is_platform_413_plain_text():
    with IntelliWattDouble(max_body_bytes=10_000) as double:
        big = os.urandom(9_000)
        resp = post(double, inline_body(big, encoding="base64"))
        assert resp.status_code == 413
        assert "json" not in resp.headers["content-type"]
        with pytest.raises(ValueError):
            resp.json()
        assert double.received() == []
        assert double.requests()[-1]["status"] == 413
        # just under the cap still goes through
        small = os.urandom(5_000)
        assert post(double, inline_body(small, encoding="base64")).status_code == 200


def test_default_cap_is_4_5_mb(webapp):
    content = os.urandom(3_400_000)  # base64 → ~4.53 MB body
    resp = post(webapp, inline_body(content, encoding="base64"), timeout=30)
    assert resp.status_code == 413
    assert webapp.requests()[-1]["body_bytes"] > 4_500_000
    resp = post(webapp, inline_body(content[:3_300_000], encoding="base64"), timeout=30)
    assert resp.status_code == 200


def test_413_does_not_buffer_body_chunked_upload():
    """A chunked body over the cap is answered 413 too (counted, not kept)."""
    with IntelliWattDouble(max_body_bytes=10_000) as double:
        payload = json.dumps(inline_body(os.urandom(20_000), encoding="base64")).encode()
        chunks = (payload[i : i + 4096] for i in range(0, len(payload), 4096))
        resp = requests.post(
            double.url + PULL_PATH,
            data=chunks,
            headers={"content-type": "application/json", "x-admin-token": double.admin_token},
            timeout=10,
        )
        assert resp.status_code == 413
        assert double.requests()[-1]["body_bytes"] == len(payload)
        # and a chunked body under the cap is read correctly
        ok = json.dumps(inline_body()).encode()
        resp = requests.post(
            double.url + PULL_PATH,
            data=iter([ok[:50], ok[50:]]),
            headers={"content-type": "application/json", "x-admin-token": double.admin_token},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text


def test_get_on_upload_path_is_405(webapp):
    resp = requests.get(webapp.url + PULL_PATH, timeout=5)
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST"


def test_secrets_never_recorded(webapp):
    post(webapp, inline_body())
    post(webapp, inline_body(), token="wrong-token-value")
    dump = json.dumps(webapp.requests())
    assert webapp.admin_token not in dump and "wrong-token-value" not in dump
    assert webapp.requests()[0]["headers"]["x-admin-token"] == "<redacted>"
    assert [r["status"] for r in webapp.requests()] == [200, 401]


# -- failure injection ---------------------------------------------------------------------------


def test_fail_next_queues_answers_then_recovers(webapp):
    webapp.fail_next(2, 500)
    webapp.fail_next(1, 429, headers={"Retry-After": "1"})
    webapp.fail_next(1, 413)
    answers = [post(webapp, inline_body()) for _ in range(5)]
    assert [r.status_code for r in answers] == [500, 500, 429, 413, 200]
    assert answers[0].json()["error"] == "STORAGE_FAILED"
    assert answers[2].headers["Retry-After"] == "1"
    assert "json" not in answers[3].headers["content-type"]
    assert len(webapp.received()) == 1
    assert [r.get("injected", False) for r in webapp.requests()] == [True] * 4 + [False]


def test_fail_next_custom_body(webapp):
    webapp.fail_next(1, 400, body={"ok": False, "error": "INLINE_DISABLED"})
    webapp.fail_next(1, 502, body="Bad Gateway")
    first, second = post(webapp, inline_body()), post(webapp, inline_body())
    assert (first.status_code, first.json()["error"]) == (400, "INLINE_DISABLED")
    assert (second.status_code, second.text) == (502, "Bad Gateway")


def test_stall_next_delays_and_still_processes(webapp):
    webapp.stall_next(1, 0.6)
    with pytest.raises(requests.Timeout):
        post(webapp, inline_body(), timeout=0.2)
    # the stalled request is processed after its sleep, like a slow app the client gave up on
    deadline = time.monotonic() + 5
    while not webapp.received() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(webapp.received()) == 1
    began = time.monotonic()
    resp = post(webapp, inline_body())
    assert time.monotonic() - began < 0.5  # only the next 1 POST was stalled
    assert resp.json()["duplicate"] is True


def test_concurrent_same_file_is_stored_once(webapp):
    body = inline_body()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: post(webapp, body), range(8)))
    assert {r.status_code for r in answers} == {200}
    assert sorted(r.json()["duplicate"] for r in answers) == [False] + [True] * 7
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(webapp.posted()) == 1


def test_wait_received_in_process_and_over_http(webapp):
    assert webapp.wait_received(1, timeout=0.1) == []
    timer = threading.Timer(0.2, lambda: post(webapp, inline_body()))
    timer.start()
    try:
        url = webapp.url + "/__double/received?wait_for=1&timeout=5"
        received = requests.get(url, timeout=10).json()["received"]
    finally:
        timer.join()
    assert len(received) == 1
    assert len(webapp.wait_received(1, timeout=0.1)) == 1


def test_reset_forgets_everything(webapp):
    post(webapp, inline_body())
    webapp.fail_next(3, 500)
    webapp.reset()
    resp = post(webapp, inline_body())
    assert resp.status_code == 200 and resp.json()["duplicate"] is False
    assert len(webapp.requests()) == 1


def test_http_controls_for_other_processes(webapp):
    ctl = webapp.url + "/__double/"
    assert requests.post(ctl + "fail", json={"n": 1, "status": 503}, timeout=5).ok
    assert requests.post(ctl + "stall", json={"n": 1, "seconds": 0.2}, timeout=5).ok
    began = time.monotonic()
    resp = post(webapp, inline_body())
    assert resp.status_code == 503 and time.monotonic() - began >= 0.2
    assert post(webapp, inline_body()).status_code == 200
    received = requests.get(ctl + "received", timeout=5).json()["received"]
    assert [r["sha256"] for r in received] == [hashlib.sha256(CSV).hexdigest()]
    assert "content_b64" not in received[0]
    with_content = requests.get(ctl + "received?content=1", timeout=5).json()["received"]
    assert base64.b64decode(with_content[0]["content_b64"]) == CSV
    reqs = requests.get(ctl + "requests", timeout=5).json()["requests"]
    assert [r["status"] for r in reqs] == [503, 200]
    bad = requests.post(ctl + "fail", json={"n": 1}, timeout=5)
    assert bad.status_code == 400
    assert requests.post(ctl + "reset", timeout=5).ok
    assert webapp.received() == [] and webapp.requests() == []


def test_stop_closes_keepalive_connections():
    double = IntelliWattDouble().start()
    session = requests.Session()
    url = double.url + PULL_PATH
    headers = {"x-admin-token": double.admin_token}
    assert session.post(url, json=inline_body(), headers=headers, timeout=5).ok
    double.stop()
    with pytest.raises(requests.ConnectionError):
        session.post(url, json=inline_body(), headers=headers, timeout=5)


def test_wrapped_base64_is_accepted_like_the_app(webapp):
    wrapped = base64.encodebytes(gzip.compress(CSV)).decode()  # newline every 76 chars
    assert "\n" in wrapped
    assert post(webapp, inline_body(content_b64=wrapped)).status_code == 200


def test_keep_content_false_drops_bytes(tmp_path):
    with IntelliWattDouble(keep_content=False, store_dir=str(tmp_path)) as double:
        data = post(double, inline_body(filename="../evil.csv")).json()
        assert data["sha256"] == hashlib.sha256(CSV).hexdigest()
        [rec] = double.received()
        assert rec["content"] is None and rec["sizeBytes"] == len(CSV)
    [stored] = list((tmp_path / "files").iterdir())  # the name cannot leave files/
    assert stored.name == "1-.._evil.csv" and stored.read_bytes() == CSV


def test_store_dir_writes_files_and_jsonl(tmp_path):
    with IntelliWattDouble(store_dir=str(tmp_path / "store")) as double:
        post(double, inline_body())
        post(double, inline_body())
    lines = (tmp_path / "store" / "received.jsonl").read_text().splitlines()
    assert [json.loads(line)["duplicate"] for line in lines] == [False, True]
    [stored] = list((tmp_path / "store" / "files").iterdir())
    assert stored.read_bytes() == CSV


def test_double_cli_reads_token_file_and_serves(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "testbed/intelliwatt_double.py"),
            *("--port", str(port), "--token-file", str(token_file)),
            *("--store-dir", str(tmp_path / "store")),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ADMIN_TOKEN"},
    )
    try:
        line = proc.stderr.readline()
        assert f"listening on http://127.0.0.1:{port}" in line
        url = f"http://127.0.0.1:{port}{PULL_PATH}"
        resp = requests.post(
            url, json=inline_body(), headers={"x-admin-token": "s3cret-token"}, timeout=5
        )
        assert resp.status_code == 200
        log_line = proc.stderr.readline()
        assert f"POST {PULL_PATH} -> 200" in log_line and "s3cret" not in log_line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    assert (tmp_path / "store" / "received.jsonl").exists()


@pytest.mark.parametrize("script", ["intelliwatt_double.py", "sftp_peer.py", "smt_csv.py"])
def test_scripts_have_help_and_run_with_system_python(script):
    # the system python3 (no venv packages): proves the modules are stdlib-only
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    out = subprocess.run(
        [python, "-I", str(REPO / "testbed" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "usage:" in out.stdout


# -- the SFTP peer -------------------------------------------------------------------------------


def _client(peer: SftpPeer) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(peer.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        peer.host,
        port=peer.port,
        username=peer.user,
        key_filename=str(peer.user_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
    )
    return client


def test_sftp_peer_serves_files_with_pinned_host_key(sftp_peer):
    data = generate_interval_csv(ESIID, date(2025, 1, 1), 2)
    (sftp_peer.root / "sub").mkdir()
    (sftp_peer.root / "a.csv").write_bytes(data)
    (sftp_peer.root / "sub" / "b.csv").write_bytes(b"x")
    assert sftp_peer.known_hosts.read_text().startswith(
        f"[127.0.0.1]:{sftp_peer.port} ssh-ed25519 AAAA"
    )
    client = _client(sftp_peer)
    try:
        sftp = client.open_sftp()
        assert sorted(sftp.listdir(str(sftp_peer.root))) == ["a.csv", "sub"]
        assert sftp.listdir(str(sftp_peer.root / "sub")) == ["b.csv"]
        with sftp.open(str(sftp_peer.root / "a.csv")) as fh:
            assert fh.read() == data
        key = client.get_transport().get_remote_server_key()
        fp = "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode()
        assert fp.rstrip("=") == sftp_peer.host_key_fingerprint
        # internal-sftp is forced: no shell commands
        _, stdout, _ = client.exec_command("echo pwned", timeout=5)
        assert b"pwned" not in stdout.read()
    finally:
        client.close()
    assert sftp_peer.start_seconds < 5


def test_sftp_peer_rejects_unknown_key_and_password(sftp_peer, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(str(sftp_peer.user_key))  # sanity: loads
    assert other.get_name() == "ssh-ed25519"
    stranger = tmp_path / "stranger"
    subprocess.run(
        [_find_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
    )
    client = paramiko.SSHClient()
    client.load_host_keys(str(sftp_peer.known_hosts))
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            sftp_peer.host,
            port=sftp_peer.port,
            username=sftp_peer.user,
            key_filename=str(stranger),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()
    client = paramiko.SSHClient()
    client.load_host_keys(str(sftp_peer.known_hosts))
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            sftp_peer.host,
            port=sftp_peer.port,
            username=sftp_peer.user,
            password="x",
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()


def test_rotate_host_key_changes_key_same_port_and_is_refused(sftp_peer):
    old_fp, old_port = sftp_peer.host_key_fingerprint, sftp_peer.port
    pinned = sftp_peer.known_hosts.read_text()
    sftp_peer.rotate_host_key()
    assert sftp_peer.port == old_port
    assert sftp_peer.host_key_fingerprint != old_fp
    assert sftp_peer.known_hosts.read_text() == pinned  # the client's pin is untouched
    with pytest.raises(paramiko.BadHostKeyException):
        _client(sftp_peer)


def test_kill_connections_drops_a_live_session(sftp_peer):
    (sftp_peer.root / "f.csv").write_bytes(b"1")
    client = _client(sftp_peer)
    try:
        sftp = client.open_sftp()
        assert sftp.listdir(str(sftp_peer.root)) == ["f.csv"]
        assert sftp_peer.connection_count() == 1
        assert sftp_peer.kill_connections() >= 1
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            sftp.listdir(str(sftp_peer.root))
    finally:
        client.close()
    # the listener survives: a new session works
    _client(sftp_peer).close()


def test_many_concurrent_sessions(sftp_peer):
    """Benchmarks and pipelined mirrors open many sessions; sshd must not throttle them."""
    (sftp_peer.root / "f.csv").write_bytes(b"data")

    def fetch(_: int) -> bytes:
        client = _client(sftp_peer)
        try:
            with client.open_sftp().open(str(sftp_peer.root / "f.csv")) as fh:
                return fh.read()
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert list(pool.map(fetch, range(16))) == [b"data"] * 16


def _nobody_can_log_in() -> bool:
    try:
        return pwd.getpwnam("nobody").pw_uid != os.geteuid() and os.geteuid() == 0
    except KeyError:
        return False


@pytest.mark.skipif(not _nobody_can_log_in(), reason="needs root and a 'nobody' account")
def test_other_login_user_with_nologin_shell(tmp_path):
    """Like the Molecule test bed: sshd as root, a system user with /usr/sbin/nologin logs in."""
    workdir = Path(tempfile.mkdtemp(prefix="sftp-peer-"))
    try:
        workdir.chmod(0o755)
        with SftpPeer(workdir, user="nobody") as peer:
            (peer.root / "a.csv").write_bytes(b"x")
            client = _client(peer)
            try:
                assert client.open_sftp().listdir(str(peer.root)) == ["a.csv"]
            finally:
                client.close()
        # pytest's tmp_path (mode 0700) is not readable by nobody: a clear error, not "auth failed"
        private = tmp_path / "private"
        with pytest.raises(SftpPeerError, match="not accessible to user nobody"):
            SftpPeer(private, user="nobody").start()
    finally:
        shutil.rmtree(workdir)


def test_unknown_user_is_a_clear_error(tmp_path):
    with pytest.raises(SftpPeerError, match="does not exist"):
        SftpPeer(tmp_path, user="no-such-user-smt").start()


def test_stop_ends_sshd_and_sessions(tmp_path):
    peer = SftpPeer(tmp_path / "peer").start()
    pid = peer.pid
    client = _client(peer)
    peer.stop()
    client.close()
    assert _gone(pid)
    with pytest.raises(OSError):
        socket.create_connection((peer.host, peer.port), timeout=1).close()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_missing_tool_message_names_the_package():
    with pytest.raises(SftpPeerError, match="openssh-server"):
        _find_tool("sshd-definitely-not-installed")


def test_sftp_peer_cli_prints_env_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "testbed/sftp_peer.py"),
            *("--workdir", str(tmp_path / "w"), "--port", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        env = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(6))
        assert set(env) == {
            "SMT_HOST", "SMT_PORT", "SMT_USER", "SMT_KEY", "SMT_KNOWN_HOSTS", "SMT_REMOTE_DIR"
        }  # fmt: skip
        assert Path(env["SMT_REMOTE_DIR"]).is_dir() and Path(env["SMT_KEY"]).is_file()
        with socket.create_connection(("127.0.0.1", int(env["SMT_PORT"])), timeout=5) as sock:
            assert sock.recv(64).startswith(b"SSH-2.0-")
        pid = int((tmp_path / "w" / "sshd.pid").read_text())
        pinned = (tmp_path / "w" / "known_hosts").read_text()
        old_pub = (tmp_path / "w" / "ssh_host_ed25519_key.pub").read_text()
        proc.send_signal(signal.SIGUSR1)  # rotate the host key
        assert "host key rotated" in proc.stderr.readline() + proc.stderr.readline()
        assert (tmp_path / "w" / "ssh_host_ed25519_key.pub").read_text() != old_pub
        assert (tmp_path / "w" / "known_hosts").read_text() == pinned
        new_pid = int((tmp_path / "w" / "sshd.pid").read_text())
        assert new_pid != pid and _gone(pid)
        pid = new_pid
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert _gone(pid)


def test_ingest_env_points_at_the_parts(ingest_env, sftp_peer, webapp, inbox):
    assert ingest_env["INTELLIWATT_BASE_URL"] == webapp.url
    assert ingest_env["ADMIN_TOKEN"] == webapp.admin_token
    assert ingest_env["SMT_PORT"] == str(sftp_peer.port)
    assert ingest_env["SMT_LOCAL_DIR"] == str(inbox)
    assert Path(ingest_env["SMT_SPOOL_DIR"]).is_dir()
    assert "ESIID_DEFAULT" not in ingest_env
    from smt_droplet.config import PostSettings, SftpSettings

    assert SftpSettings.from_env(ingest_env).port == sftp_peer.port
    assert PostSettings.from_env(ingest_env).endpoint == webapp.url + PULL_PATH


# -- the SMT CSV generator -----------------------------------------------------------------------

ROW_RE = re.compile(
    r"'(?P<esiid>\d{17}),(?P<date>\d{1,2}/\d{1,2}/\d{4}),\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2},"
    r"(?P<start>\d{1,2}:\d{2}),(?P<end>\d{1,2}:\d{2}),(?P<kwh>\d+\.\d{3})?,(?P<flag>[AE])?,"
    r"Consumption"
)


def _rows_by_day(data: bytes) -> dict[str, list[re.Match]]:
    lines = data.decode().splitlines()
    assert lines[0] == HEADER
    days: dict[str, list[re.Match]] = {}
    for line in lines[1:]:
        match = ROW_RE.fullmatch(line)
        assert match, line
        days.setdefault(match["date"], []).append(match)
    return days


def test_generator_layout_matches_the_contract():
    start = date(2024, 11, 1)
    data = generate_interval_csv(ESIID, start, 365, seed=7)
    assert data.startswith(HEADER.encode() + b"\n") and b"\r" not in data
    assert data.splitlines()[1].startswith(b"'10443720000000099,11/1/2024,")
    days = _rows_by_day(data)
    assert len(days) == 365
    fall = dst_fall_back(2024)
    spring = dst_spring_forward(2025)
    assert (fall, spring) == (date(2024, 11, 3), date(2025, 3, 9))
    for day, rows in days.items():
        assert rows[-1]["end"] == "0:00"
        assert rows[0]["start"] == "0:00"
        assert {r["esiid"] for r in rows} == {ESIID}
        if day == "11/3/2024":
            assert len(rows) == 100
            starts = [r["start"] for r in rows]
            assert starts.count("1:00") == 2 and starts.count("1:45") == 2
        else:
            assert len(rows) == 96, day
        empty = [r["start"] for r in rows if r["kwh"] is None]
        if day == "3/9/2025":
            assert empty == ["2:00", "2:15", "2:30", "2:45"]
            assert all(r["flag"] is None for r in rows if r["kwh"] is None)
        else:
            assert empty == []
    assert 2_450_000 < len(data) < 2_850_000  # a real 12-month export is ~2.6 MB
    assert 5 < len(data) / len(gzip.compress(data)) < 15  # compresses like real SMT data
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert {len(r) for r in rows} == {8}


def test_generator_is_deterministic_per_seed():
    a = generate_interval_csv(ESIID, date(2025, 1, 1), 3, seed=1)
    assert a == generate_interval_csv(ESIID, date(2025, 1, 1), 3, seed=1)
    assert a != generate_interval_csv(ESIID, date(2025, 1, 1), 3, seed=2)
    assert random_esiid(5) == random_esiid(5) != random_esiid(6)
    for seed in range(50):
        assert re.fullmatch(r"10\d{15}", random_esiid(seed))


def test_generator_matches_shared_fixture_layout_when_present():
    fixture = shared_fixture("smt/IntervalMeterUsage_10443720000000099_20251101.csv")
    if fixture is None:
        pytest.skip("shared fixture not present (the layout test above covers the contract)")
    real = fixture.read_bytes()
    ours = generate_interval_csv(ESIID, date(2024, 11, 1), 365)
    real_days, our_days = _rows_by_day(real), _rows_by_day(ours)
    assert list(real_days) == list(our_days)
    assert {d: len(r) for d, r in real_days.items()} == {d: len(r) for d, r in our_days.items()}
    for day in ("11/3/2024", "3/9/2025"):
        assert [r["start"] for r in real_days[day]] == [r["start"] for r in our_days[day]]
        assert [r["kwh"] is None for r in real_days[day]] == [
            r["kwh"] is None for r in our_days[day]
        ]
    assert abs(len(real) - len(ours)) / len(real) < 0.05


def test_generator_cli_writes_file(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(REPO / "testbed/smt_csv.py"),
            *("--esiid", ESIID, "--start", "2025-03-08", "--days", "2", "--out", str(tmp_path)),
        ],
        check=True,
        capture_output=True,
    )
    [out] = list(tmp_path.iterdir())
    assert out.name == f"IntervalMeterUsage_{ESIID}_20250310.csv"
    assert out.read_bytes() == generate_interval_csv(ESIID, date(2025, 3, 8), 2)


def test_smt_csv_fixture_factory(smt_csv, tmp_path):
    path = smt_csv.write(tmp_path / "remote", esiid=ESIID, days=2)
    assert path.name == f"IntervalMeterUsage_{ESIID}_20250310.csv"
    assert path.read_bytes() == smt_csv(esiid=ESIID, days=2)
    assert smt_csv(seed=3).splitlines()[1].startswith(b"'" + random_esiid(3).encode())


# -- the double's raw-upload path and the app's eras -----------------------------------------


def raw_body(content: bytes, name: str = "f.csv", **over: Any) -> dict:
    body: dict[str, Any] = {
        "filename": name,
        "sizeBytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "contentBase64": base64.b64encode(content).decode(),
        "esiid": ESIID,
        "contentType": "text/csv",
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


def raw_post(webapp: IntelliWattDouble, body: Any, token: str | None = "default"):
    headers = {"x-admin-token": webapp.admin_token if token == "default" else token or ""}
    return requests.post(f"{webapp.url}{RAW_UPLOAD_PATH}", json=body, headers=headers, timeout=10)


def test_raw_upload_validates_like_the_app_and_counts_what_it_stored(webapp):
    assert raw_post(webapp, raw_body(CSV), token="wrong").status_code == 401
    bad = raw_post(webapp, raw_body(CSV, filename=_DROP, sha256=_DROP, sizeBytes="12"))
    assert bad.status_code == 400 and bad.json()["error"] == "VALIDATION"
    assert bad.json()["missing"] == [
        "filename (string)",
        "size_bytes|sizeBytes (number)",
        "sha256 (string)",
    ]
    data = generate_interval_csv(ESIID, date(2026, 6, 10), 2)
    first = raw_post(webapp, raw_body(data)).json()
    assert first["ok"] is True and "duplicate" not in first
    assert first["normalizedInline"]["records"] == 192
    assert first["normalizedInline"]["tsMin"] == "2026-06-10T05:00:00.000Z"
    again = raw_post(webapp, raw_body(data)).json()  # the same sha256: parsed again
    assert again["duplicate"] is True and again["id"] == first["id"]
    assert again["normalizedInline"]["records"] == 192
    assert len(webapp.app.stored(ESIID)) == 192
    gz = raw_post(webapp, raw_body(gzip.compress(data), name="g.csv")).json()
    assert gz["ok"] is True and gz["normalizedInline"]["records"] == 0  # gzip: 0 rows


def test_raw_upload_failure_modes_are_switchable(webapp):
    fall = generate_interval_csv(ESIID, date(2026, 10, 31), 3)
    assert raw_post(webapp, raw_body(fall)).json()["normalizedInline"]["records"] == 292
    webapp.reset()
    webapp.configure(dst_overwrite=True)
    assert raw_post(webapp, raw_body(fall)).json()["normalizedInline"]["records"] == 288
    webapp.configure(dst_overwrite=False, window_days=365)
    old = generate_interval_csv(ESIID, date(2024, 6, 1), 1)
    assert raw_post(webapp, raw_body(old)).json()["normalizedInline"] is None
    webapp.configure(window_days=None, drop_intervals=5)
    day = generate_interval_csv(ESIID, date(2026, 6, 10), 1)
    assert raw_post(webapp, raw_body(day)).json()["normalizedInline"]["records"] == 91


def test_parts_are_reassembled_and_a_missing_part_is_seen(webapp):
    data = generate_interval_csv(ESIID, date(2026, 6, 10), 3)
    header, rest = data.split(b"\n", 1)
    lines = rest.splitlines(keepends=True)
    parts = [header + b"\n" + b"".join(lines[i::3]) for i in range(3)]  # order does not matter
    for i in (1, 3):
        raw_post(webapp, raw_body(parts[i - 1], name=f"f.csv.part{i}-of-3"))
    assert webapp.assembled()["f.csv"]["content"] is None  # part 2 never came
    raw_post(webapp, raw_body(parts[1], name="f.csv.part2-of-3"))
    whole = webapp.assembled()["f.csv"]
    assert whole["content"] == parts[0] + parts[1][len(header) + 1 :] + parts[2][len(header) + 1 :]
    assert whole["copies"] == 1


def test_eras_refuse_inline_like_the_app(webapp):
    webapp.configure(era="production", known_esiids=[ESIID])
    unknown = post(webapp, inline_body(esiid="10443720000000011"))
    assert (unknown.status_code, unknown.json()["error"]) == (400, "HOME_ID_REQUIRED")
    known = post(webapp, inline_body())
    assert (known.status_code, known.json()["error"]) == (400, "INLINE_DISABLED")
    with_home = post(webapp, inline_body(esiid="10443720000000011", homeId="h1"))
    assert with_home.json()["error"] == "INLINE_DISABLED"
    webapp.configure(era="2026-dev")
    assert post(webapp, inline_body()).status_code == 200
    assert post(webapp, inline_body(esiid="10443720000000011")).json()["error"] == (
        "HOME_ID_REQUIRED"
    )
    ctl = webapp.url + "/__double/config"
    assert requests.post(ctl, json={"era": "2025-11"}, timeout=5).ok
    assert post(webapp, inline_body(esiid="10443720000000011")).status_code == 200
    assert requests.post(ctl, json={"era": "1999"}, timeout=5).status_code == 400
    assert raw_post(webapp, raw_body(CSV)).status_code == 200  # raw-upload in every era
