"""The upload server, started for real (``python -m smt_droplet upload-server``) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import requests
from serverproc import ServerProcess, raw_request, run_once

from smt_droplet import filenames
from smt_droplet.config import UploadSettings
from smt_droplet.tickets import mint
from smt_droplet.upload_store import InboxStore, Partial, looks_like_csv

TOKEN = "upload-token-for-tests"
TICKET_SECRET = "ticket-secret-for-tests-0123456789"


def ticket(role: str, account: str, max_bytes: int = 10_000_000, ttl: int = 600) -> dict[str, str]:
    """The header a web-app user's browser sends (the app minted the ticket)."""
    token = mint(TICKET_SECRET, role, account, int(time.time()) + ttl, max_bytes)
    return {"x-smt-upload-ticket": token}


STORED = re.compile(r"\A\d{8}T\d{6}_[A-Za-z0-9][A-Za-z0-9._-]*\.csv(\.\d+)?\Z")


def csv_bytes(seed: int = 0, rows: int = 20) -> bytes:
    lines = [
        "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,"
        "ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION"
    ]
    for i in range(rows):
        lines.append(
            f"'10443720000000099,11/1/2025,11/2/2025 1:05,{i // 4}:{(i % 4) * 15:02d},"
            f"{(i + 1) // 4}:{((i + 1) % 4) * 15:02d},"
            f"{(seed * 31 + i) % 997 / 1000:.3f},A,Consumption"
        )
    return ("\n".join(lines) + "\n").encode()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undaryXYZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += (
                f"; {filename}" if filename.startswith("filename") else f'; filename="{filename}"'
            )
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: text/csv\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_head(port: int, length: int | None, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        "POST /upload HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: multipart/form-data; boundary=b0undaryXYZ",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Box:
    """An inbox, a spool and a limiter database in tmp_path, plus the server's env."""

    def __init__(self, root: Path, **extra: str) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.spool = root / "spool"
        self.inbox.mkdir()
        self.env = {
            "SMT_LOCAL_DIR": str(self.inbox),
            "SMT_SPOOL_DIR": str(self.spool),
            "SMT_UPLOAD_STATE": str(root / "state" / "ratelimit.sqlite3"),
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": "0",
            "SMT_UPLOAD_TOKEN": TOKEN,
            "SMT_UPLOAD_TICKET_SECRET": TICKET_SECRET,
            "SMT_UPLOAD_MAX_BYTES": "200000",
            "SMT_SHUTDOWN_GRACE": "1",
        }
        self.env.update(extra)
        self.servers: list[ServerProcess] = []

    def start(self) -> ServerProcess:
        server = ServerProcess("upload-server", self.env, self.root / "server.log").start()
        self.servers.append(server)
        return server

    def inbox_names(self) -> list[str]:
        return sorted(os.listdir(self.inbox))

    def queued(self) -> list[dict]:
        queue = self.spool / "queue"
        if not queue.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(queue.glob("*.json"))]


@pytest.fixture
def box(tmp_path: Path):
    b = Box(tmp_path)
    yield b
    for server in b.servers:
        server.ensure_stopped()


@pytest.fixture
def server(box: Box) -> ServerProcess:
    return box.start()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """One server for the many parametrized rejection cases; tests compare before/after."""
    b = Box(tmp_path_factory.mktemp("shared-upload"))
    b.start()
    yield b
    for server in b.servers:
        server.ensure_stopped()


def upload(
    server: ServerProcess,
    data: bytes,
    name: str = "IntervalMeterUsage.csv",
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
) -> requests.Response:
    h = dict(headers or {})
    if token is not None:
        h["x-smt-upload-token"] = token
    return requests.post(
        server.url("/upload"),
        files={"file": (name, data, "text/csv")},
        data=fields or {},
        headers=h,
        timeout=20,
    )


# -- the happy path ------------------------------------------------------------------------------


def test_upload_is_stored_hashed_and_queued(box: Box, server: ServerProcess) -> None:
    data = csv_bytes(1)
    r = upload(server, data, token=None, headers=ticket("admin", "ops-1"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["ok"] and body["stored"] and body["queued"]
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["sizeBytes"] == len(data)
    assert body["role"] == "admin" and body["accountKey"] == "ops-1"
    assert body["limit"] == 50 and body["remaining"] == 49
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["resetAt"])
    assert STORED.match(body["filename"]) and body["filename"].endswith("_IntervalMeterUsage.csv")
    stored = box.inbox / body["filename"]
    assert stored.read_bytes() == data
    assert box.inbox_names() == [body["filename"]]  # no temp file left beside it
    mode = stat.S_IMODE(stored.stat().st_mode)
    assert mode == 0o660, oct(mode)  # group-writable under the service's UMask=0007
    (request,) = box.queued()
    assert request["kind"] == "upload" and request["filename"] == body["filename"]
    assert request["id"] == body["id"]
    assert request["extra"]["sha256"] == body["sha256"]
    log = server.log()
    assert "POST /upload 202" in log and "client=127.0.0.1" in log
    assert TOKEN not in log


def test_esiid_and_meter_fields_reach_the_spool_request(box: Box, server: ServerProcess) -> None:
    r = upload(server, csv_bytes(17), fields={"esiid": "'10443720004529147", "meter": "M2"})
    assert r.status_code == 202
    (request,) = box.queued()
    assert request["esiid"] == "10443720004529147" and request["meter"] == "M2"
    r = upload(server, csv_bytes(18), fields={"esiid": "123"})
    assert r.status_code == 400 and r.json()["error"] == "bad_esiid"
    r = upload(server, csv_bytes(19), fields={"meter": "M1;reboot"})
    assert r.status_code == 400 and r.json()["error"] == "bad_meter"
    assert len(box.inbox_names()) == 1 and len(box.queued()) == 1


def test_health_and_unknown_routes(box: Box, server: ServerProcess) -> None:
    r = requests.get(server.url("/health"), timeout=5)
    assert r.status_code == 200
    assert r.json() == {"ok": True, "service": "smt-upload"}  # strangers learn nothing more
    r = requests.get(server.url("/health"), headers={"x-smt-upload-token": TOKEN}, timeout=5)
    assert r.json()["ok"] is True and r.json()["queueDepth"] == 0
    assert r.json()["checks"] == {
        "spool": True,
        "inbox": True,
        "limiter": True,
        "disk": True,
        "ingest": True,
    }
    assert requests.get(server.url("/nope"), timeout=5).status_code == 404
    assert requests.get(server.url("/upload"), timeout=5).status_code == 405


def test_without_token_configured_uploads_are_open(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_UPLOAD_TOKEN="")
    server = box.start()
    try:
        assert upload(server, csv_bytes(2), token=None).status_code == 202
    finally:
        server.ensure_stopped()


def test_never_overwrites_an_existing_name(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = UploadSettings.from_env(
        {"SMT_LOCAL_DIR": str(inbox), "SMT_UPLOAD_STATE": str(tmp_path / "rl.db")}
    )
    store = InboxStore(settings)
    (inbox / "20250101T000000_a.csv").write_bytes(b"original\n")
    (inbox / "20250101T000000_a-1.csv").write_bytes(b"original 1\n")
    tmp = inbox / filenames.temp_name()
    tmp.write_bytes(b"new,data\n")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        final = store.commit(Partial(tmp, fd), "20250101T000000_a.csv")
    finally:
        os.close(fd)
    assert final == "20250101T000000_a-2.csv"
    assert (inbox / "20250101T000000_a.csv").read_bytes() == b"original\n"
    assert (inbox / "20250101T000000_a-1.csv").read_bytes() == b"original 1\n"
    assert (inbox / final).read_bytes() == b"new,data\n"
    assert not tmp.exists()


def test_two_uploads_with_the_same_name_both_survive(box: Box, server: ServerProcess) -> None:
    names = {upload(server, csv_bytes(i), name="same.csv").json()["filename"] for i in range(4)}
    assert len(names) == 4
    assert len(box.inbox_names()) == 4


# -- auth happens before the body ----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
def test_wrong_token_is_401_and_leaves_the_inbox_untouched(shared: Box, token: str | None) -> None:
    box, server = shared, shared.servers[0]
    before, queued_before = box.inbox_names(), box.queued()
    r = upload(server, csv_bytes(3), token=token)
    assert r.status_code == 401
    assert r.json() == {
        "ok": False,
        "error": "unauthorized",
        "message": "Invalid or missing SMT upload token",
    }
    assert box.inbox_names() == before
    assert box.queued() == queued_before


def test_expect_100_continue_is_refused_before_the_body_is_sent(
    box: Box, server: ServerProcess
) -> None:
    body = multipart([("file", "a.csv", csv_bytes(4))])
    head = post_head(server.port, len(body), {"Expect": "100-continue", "x-smt-upload-token": "no"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)  # the body is held back, as curl does for big uploads
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"100 Continue" not in answer
    assert box.inbox_names() == []

    ok_head = post_head(
        server.port, len(body), {"Expect": "100-continue", "x-smt-upload-token": TOKEN}
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(ok_head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = b""
        while b'"stored": true' not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert len(box.inbox_names()) == 1


# -- size, type and shape ------------------------------------------------------------------------


def test_declared_size_over_the_cap_is_413_before_reading(box: Box, server: ServerProcess) -> None:
    head = post_head(server.port, 50_000_000, {"x-smt-upload-token": TOKEN})
    answer = raw_request(server.port, head, b"--b0undaryXYZ\r\n")  # body mostly never sent
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert box.inbox_names() == []


def test_streamed_body_over_the_cap_is_413_and_the_partial_file_is_removed(
    box: Box, server: ServerProcess
) -> None:
    big = csv_bytes(5, rows=4000)  # ~300 kB > the 200 kB cap
    assert len(big) > 200_000
    body = multipart([("file", "big.csv", big)])

    def chunks():  # no Content-Length: chunked transfer, the server must count as it goes
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = requests.post(
        server.url("/upload"),
        data=chunks(),
        headers={
            "x-smt-upload-token": TOKEN,
            "Content-Type": "multipart/form-data; boundary=b0undaryXYZ",
        },
        timeout=20,
    )
    assert r.status_code == 413
    assert r.json()["error"] == "file_too_large"
    assert box.inbox_names() == []
    assert box.queued() == []


def test_exactly_the_cap_is_accepted(tmp_path: Path) -> None:
    data = csv_bytes(6, rows=200)
    box = Box(tmp_path, SMT_UPLOAD_MAX_BYTES=str(len(data)))
    server = box.start()
    try:
        assert upload(server, data).status_code == 202
        assert upload(server, data + b"x,y\n").status_code == 413
        assert len(box.inbox_names()) == 1
    finally:
        server.ensure_stopped()


def test_below_the_free_space_floor_uploads_are_507_before_the_body(tmp_path: Path) -> None:
    """The same SMT_MIN_FREE_MB that stops the pass's downloads (tests/test_lifecycle.py)."""
    free_mib = shutil.disk_usage(tmp_path).free // 2**20
    box = Box(tmp_path, SMT_MIN_FREE_MB=str(free_mib + 1024))
    server = box.start()
    try:
        refused = upload(server, csv_bytes(7))
        assert refused.status_code == 507 and refused.json()["error"] == "insufficient_storage"
        assert box.inbox_names() == [] and box.queued() == []
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            head = {"Expect": "100-continue", "x-smt-upload-token": TOKEN}
            sock.sendall(post_head(server.port, 5000, head))
            assert sock.recv(200).startswith(b"HTTP/1.1 507")  # no body was sent
    finally:
        server.ensure_stopped()
    log = (tmp_path / "server.log").read_text()
    assert f"SMT_MIN_FREE_MB={free_mib + 1024}" in log
    (tmp_path / "roomy").mkdir()
    roomy = Box(tmp_path / "roomy", SMT_MIN_FREE_MB="1")
    server = roomy.start()
    try:
        assert upload(server, csv_bytes(7)).status_code == 202
    finally:
        server.ensure_stopped()


@pytest.mark.parametrize(
    ("name", "data", "status", "error"),
    [
        ("report.txt", b"a,b\n1,2\n", 415, "unsupported_type"),
        ("report.csv.asc", b"a,b\n", 415, "unsupported_type"),
        ("noext", b"a,b\n", 415, "unsupported_type"),
        ("x.csv", b"", 400, "not_csv"),
        ("x.csv", b"PK\x03\x04\x14\x00\x00\x00binary zip", 400, "not_csv"),
        ("x.csv", b"\x1f\x8b\x08\x00gzip", 400, "not_csv"),
        ("x.csv", b"just some words without separators\n", 400, "not_csv"),
        ("x.csv", b"-----BEGIN PGP MESSAGE-----\nabc\n", 400, "not_csv"),
        ("x.csv", b"a" * 20000, 400, "not_csv"),
    ],
)
def test_non_csv_uploads_are_refused(
    shared: Box, name: str, data: bytes, status: int, error: str
) -> None:
    box, server = shared, shared.servers[0]
    before, queued_before = box.inbox_names(), box.queued()
    r = upload(server, data, name=name)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert r.json()["message"]
    assert box.inbox_names() == before
    assert box.queued() == queued_before


def test_missing_file_field_and_non_multipart(box: Box, server: ServerProcess) -> None:
    r = requests.post(
        server.url("/upload"),
        files={"other": ("a.csv", b"a,b\n")},
        headers={"x-smt-upload-token": TOKEN},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["error"] == "missing_file"
    r = requests.post(
        server.url("/upload"), data=b"a,b\n", headers={"x-smt-upload-token": TOKEN}, timeout=5
    )
    assert r.status_code == 415 and r.json()["error"] == "expected_multipart"
    r = upload(server, csv_bytes(7), token=None, headers={"x-smt-upload-ticket": "v1.x.y"})
    assert r.status_code == 401 and r.json()["error"] == "bad_ticket"
    assert box.inbox_names() == []


def test_malformed_multipart_is_400(box: Box, server: ServerProcess) -> None:
    body = b"this is not multipart at all"
    head = post_head(server.port, len(body), {"x-smt-upload-token": TOKEN, "Connection": "close"})
    answer = raw_request(server.port, head, body)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert box.inbox_names() == []


# -- untrusted names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "disposition",
    [
        'filename="../../../etc/cron.d/evil.csv"',
        'filename="..\\\\..\\\\windows\\\\evil.csv"',
        'filename="/abs/path/x.csv"',
        "filename*=UTF-8''..%2F..%2Fevil%0A%0D%01%7F.csv",
        "filename*=UTF-8''%2E%2E.csv",
        "filename*=UTF-8''caf%C3%A9%20%E2%80%AE%20vsc.csv",
        'filename=".hidden.csv"',
        'filename="' + "a" * 400 + '.csv"',
    ],
)
def test_hostile_names_land_safely_inside_the_inbox(shared: Box, disposition: str) -> None:
    box, server = shared, shared.servers[0]
    outside_before = sorted(os.listdir(box.root))
    before = set(box.inbox_names())
    body = multipart([("file", disposition, csv_bytes(8) + disposition.encode())])
    head = post_head(server.port, len(body), {"x-smt-upload-token": TOKEN, "Connection": "close"})
    answer = raw_request(server.port, head, body)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    (name,) = set(box.inbox_names()) - before
    assert STORED.match(name), name
    assert ".." not in name and "/" not in name and len(name) <= 16 + filenames.MAX_STEM + 4
    assert (box.inbox / name).is_file()
    assert sorted(os.listdir(box.root)) == outside_before
    assert not Path("/etc/cron.d/evil.csv").exists()


# -- cut-off bodies and shutdown -----------------------------------------------------------------


def test_upload_cut_off_mid_body_leaves_nothing_behind(box: Box, server: ServerProcess) -> None:
    data = csv_bytes(9, rows=2000)
    body = multipart([("file", "cut.csv", data)])
    head = post_head(server.port, len(body), {"x-smt-upload-token": TOKEN})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + body[: len(body) // 2])
        # Wait until the partial file exists, so the cut really happens mid-write.
        deadline = time.monotonic() + 5
        while not any(filenames.is_temp_name(n) for n in box.inbox_names()):
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.01)
    server.wait_for_log("outcome=incomplete_body")
    assert box.inbox_names() == []
    assert box.queued() == []
    # The slot the cut-off upload reserved was given back.
    r = upload(server, csv_bytes(10))
    assert r.json()["remaining"] == 49


def test_sigterm_during_an_upload_leaves_no_partial_file(box: Box, server: ServerProcess) -> None:
    body = multipart([("file", "slow.csv", csv_bytes(11, rows=2000))])
    head = post_head(server.port, len(body), {"x-smt-upload-token": TOKEN})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(head + body[: len(body) // 2])
        deadline = time.monotonic() + 5
        while not any(filenames.is_temp_name(n) for n in box.inbox_names()):
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.01)
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0  # grace is 1 s; the client never finishes
        assert time.monotonic() - started < 8
    finally:
        sock.close()
    assert box.inbox_names() == []
    assert box.queued() == []
    assert "SIGTERM received" in server.log()


def test_sigterm_lets_an_upload_in_flight_finish(box: Box, server: ServerProcess) -> None:
    body = multipart([("file", "finish.csv", csv_bytes(12, rows=2000))])
    head = post_head(server.port, len(body), {"x-smt-upload-token": TOKEN})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + body[: len(body) // 2])
        deadline = time.monotonic() + 5
        while not any(filenames.is_temp_name(n) for n in box.inbox_names()):
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.01)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log("SIGTERM received")
        sock.sendall(body[len(body) // 2 :])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert server.proc.wait(10) == 0
    (name,) = box.inbox_names()
    assert name.endswith("_finish.csv")
    assert len(box.queued()) == 1
    # No new connections once draining started.
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url("/health"), timeout=2)


def test_stale_partial_files_are_removed_at_startup(box: Box) -> None:
    stale = box.inbox / filenames.temp_name()
    stale.write_bytes(b"half an upload")
    keep = box.inbox / "20250101T000000_keep.csv"
    keep.write_bytes(b"a,b\n")
    server = box.start()
    assert not stale.exists() and keep.exists()
    assert "removed 1 stale partial upload" in server.log()


# -- duplicates -----------------------------------------------------------------------------------


def test_an_already_posted_file_is_a_200_duplicate_and_not_queued(box: Box) -> None:
    data = csv_bytes(13)
    (box.inbox / ".posted_sha256").write_text(
        "0" * 64 + "\n" + hashlib.sha256(data).hexdigest() + "\n"
    )
    server = box.start()
    r = upload(server, data)
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True and body["duplicate"] is True and body["queued"] is False
    assert box.inbox_names() == [".posted_sha256"]
    assert box.queued() == []
    # A file that is not in the ledger still goes through.
    assert upload(server, csv_bytes(14)).status_code == 202


def test_state_file_setting_names_the_ledger(tmp_path: Path) -> None:
    data = csv_bytes(15)
    ledger = tmp_path / "ledger.txt"
    ledger.write_text(hashlib.sha256(data).hexdigest().upper() + "\r\n")
    box = Box(tmp_path, STATE_FILE=str(ledger))
    server = box.start()
    try:
        assert upload(server, data).json()["duplicate"] is True
    finally:
        server.ensure_stopped()


def test_an_unreadable_ledger_does_not_block_uploads(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger-is-a-directory"
    ledger.mkdir()
    box = Box(tmp_path, STATE_FILE=str(ledger))
    server = box.start()
    try:
        assert upload(server, csv_bytes(16)).status_code == 202
        assert "cannot read the ledger" in server.log()
    finally:
        server.ensure_stopped()


# -- rate limits ----------------------------------------------------------------------------------


def test_51st_admin_upload_is_429_and_stays_429_after_a_restart(box: Box) -> None:
    server = box.start()
    headers = ticket("admin", "ops")
    for i in range(50):
        r = upload(server, csv_bytes(100 + i), token=None, headers=headers)
        assert r.status_code == 202, (i, r.text)
    assert r.json()["remaining"] == 0
    before = box.inbox_names()
    r = upload(server, csv_bytes(200), token=None, headers=headers)
    assert r.status_code == 429
    body = r.json()
    assert body["error"] == "rate_limited" and body["limit"] == 50 and body["remaining"] == 0
    assert 86000 < int(r.headers["Retry-After"]) <= 86400
    assert body["resetAt"].endswith("Z")
    assert box.inbox_names() == before  # the 429 wrote nothing

    assert server.stop() == 0
    server = box.start()
    r = upload(server, csv_bytes(201), token=None, headers=headers)
    assert r.status_code == 429
    # Another account (its own ticket) has its own budget.
    r = upload(server, csv_bytes(202), token=None, headers=ticket("admin", "ops2"))
    assert r.status_code == 202


def test_spent_budget_is_refused_before_100_continue(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="1")
    server = box.start()
    try:
        headers = ticket("customer", "home-7")
        assert upload(server, csv_bytes(25), token=None, headers=headers).status_code == 202
        body = multipart([("file", "b.csv", csv_bytes(26))])
        head = post_head(
            server.port,
            len(body),
            {"Expect": "100-continue", **headers},
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert b"Retry-After:" in answer and b"100 Continue" not in answer
        assert len(box.inbox_names()) == 1
    finally:
        server.ensure_stopped()


def test_customer_limit_from_the_ticket_and_window(tmp_path: Path) -> None:
    box = Box(
        tmp_path,
        SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="2",
        SMT_CUSTOMER_UPLOAD_WINDOW_SECONDS="2",
    )
    server = box.start()
    try:
        home = ticket("customer", "home-42")
        assert upload(server, csv_bytes(20), token=None, headers=home).json()["remaining"] == 1
        assert upload(server, csv_bytes(21), token=None, headers=home).status_code == 202
        r = upload(server, csv_bytes(22), token=None, headers=home)
        assert r.status_code == 429
        assert r.json()["role"] == "customer" and r.json()["accountKey"] == "home-42"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        assert len(box.inbox_names()) == 2
        # Admin uploads (the static token) are counted apart.
        assert upload(server, csv_bytes(23)).status_code == 202
        time.sleep(2.1)  # the window slides
        assert upload(server, csv_bytes(24), token=None, headers=home).status_code == 202
    finally:
        server.ensure_stopped()


def test_fields_and_headers_cannot_choose_role_or_account(tmp_path: Path) -> None:
    """Customer A at its limit used to get a fresh budget by sending accountKey=B (or a
    full-width A), and the admin limit by sending role=admin."""
    box = Box(tmp_path, SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="1")
    server = box.start()
    try:
        a = ticket("customer", "A")
        assert upload(server, csv_bytes(30), token=None, headers=a).status_code == 202
        tries = [
            ({}, {"accountKey": "B"}),
            ({}, {"accountKey": chr(0xFF21)}),  # full-width A
            ({}, {"role": "admin"}),
            ({"x-smt-upload-role": "admin", "x-smt-upload-account-key": "B"}, {}),
        ]
        for i, (extra, fields) in enumerate(tries):
            headers = {**a, **extra}
            r = upload(server, csv_bytes(31 + i), token=None, headers=headers, fields=fields)
            assert r.status_code == 429, (extra, fields, r.text)
            assert r.json()["role"] == "customer" and r.json()["accountKey"] == "A"
        # A ticket the app did not sign, or one that expired, is no identity at all.
        forged = {"x-smt-upload-ticket": mint("guessed", "admin", "B", int(time.time()) + 60, 10)}
        expired = ticket("customer", "B", ttl=-5)
        for headers in (forged, expired):
            r = upload(server, csv_bytes(40), token=None, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "bad_ticket", r.text
        assert len(box.inbox_names()) == 1
    finally:
        server.ensure_stopped()


def test_anonymous_mode_keys_the_budget_by_address_whatever_the_fields_say(
    tmp_path: Path,
) -> None:
    box = Box(
        tmp_path,
        SMT_UPLOAD_TOKEN="",
        SMT_UPLOAD_DEFAULT_ROLE="customer",
        SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="1",
    )
    server = box.start()
    try:
        assert upload(server, csv_bytes(50), token=None).status_code == 202
        for fields in ({"accountKey": "other"}, {"role": "admin", "accountKey": "x"}):
            r = upload(server, csv_bytes(51), token=None, fields=fields)
            assert r.status_code == 429 and r.json()["accountKey"] is None, r.text
    finally:
        server.ensure_stopped()


def test_a_client_address_has_a_daily_cap_whoever_it_claims_to_be(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_UPLOAD_CLIENT_DAILY_LIMIT="3")
    server = box.start()
    try:
        answers = [
            upload(server, csv_bytes(60 + i), token=None, headers=ticket("customer", f"c{i}"))
            for i in range(5)
        ]
        assert [r.status_code for r in answers] == [202, 202, 202, 429, 429]
        assert answers[3].json()["error"] == "client_rate_limited"
        assert 86000 < int(answers[3].headers["Retry-After"]) <= 86400
        assert len(box.inbox_names()) == 3
    finally:
        server.ensure_stopped()


def test_a_ticket_caps_the_file_size(box: Box, server: ServerProcess) -> None:
    small = ticket("customer", "tiny", max_bytes=500)
    r = upload(server, csv_bytes(70, rows=50), token=None, headers=small)
    assert r.status_code == 413 and r.json()["error"] == "file_too_large", r.text
    assert upload(server, csv_bytes(70, rows=2), token=None, headers=small).status_code == 202


def test_identical_bytes_waiting_in_the_inbox_are_stored_once(
    box: Box, server: ServerProcess
) -> None:
    data = csv_bytes(80)
    first = upload(server, data)
    assert first.status_code == 202 and first.json()["stored"] is True
    for _ in range(3):
        again = upload(server, data, name="renamed.csv")
        assert again.status_code == 200, again.text
        assert again.json()["duplicate"] is True and again.json()["stored"] is False
        assert again.json()["filename"] == first.json()["filename"]
    assert box.inbox_names() == [first.json()["filename"]] and len(box.queued()) == 1
    # Once it has left the inbox, the same bytes may come again.
    (box.inbox / first.json()["filename"]).unlink()
    assert upload(server, data).status_code == 202


def test_rejected_uploads_do_not_use_up_the_limit(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_ADMIN_UPLOAD_DAILY_LIMIT="1")
    server = box.start()
    try:
        assert upload(server, b"not a csv", name="x.csv").status_code == 400
        assert upload(server, b"a,b\n", name="x.txt").status_code == 415
        assert upload(server, csv_bytes(40)).status_code == 202
        assert upload(server, csv_bytes(41)).status_code == 429
    finally:
        server.ensure_stopped()


# -- CORS -----------------------------------------------------------------------------------------


def test_cors_for_the_configured_origin_only(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_UPLOAD_CORS_ORIGIN="https://intelliwatt.example")
    server = box.start()
    try:
        pre = requests.options(
            server.url("/upload"),
            headers={
                "Origin": "https://intelliwatt.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-smt-upload-token",
            },
            timeout=5,
        )
        assert pre.status_code == 204
        assert pre.headers["Access-Control-Allow-Origin"] == "https://intelliwatt.example"
        assert "x-smt-upload-token" in pre.headers["Access-Control-Allow-Headers"]
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        bad = requests.options(
            server.url("/upload"), headers={"Origin": "https://evil.example"}, timeout=5
        )
        assert bad.status_code == 403
        assert "Access-Control-Allow-Origin" not in bad.headers
        r = upload(server, csv_bytes(50), headers={"Origin": "https://intelliwatt.example"})
        assert r.status_code == 202
        assert r.headers["Access-Control-Allow-Origin"] == "https://intelliwatt.example"
        r = upload(server, csv_bytes(51), token="bad", headers={"Origin": "https://evil.example"})
        assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers
    finally:
        server.ensure_stopped()


# -- memory and startup ---------------------------------------------------------------------------


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_25_mb_upload_is_streamed_not_buffered(tmp_path: Path) -> None:
    box = Box(tmp_path, SMT_UPLOAD_MAX_BYTES=str(25 * 1024 * 1024))
    server = box.start()
    try:
        row = b"'10443720000000099,11/1/2025,11/2/2025 1:05,0:00,0:15,0.207,A,Consumption\n"
        data = csv_bytes(60, rows=1) + row * ((25 * 1024 * 1024 - 200) // len(row))
        assert server.proc is not None
        requests.get(server.url("/health"), timeout=5)
        before = _vm_hwm_kib(server.proc.pid)

        r = upload(server, data, name="big.csv")
        assert r.status_code == 202, r.text
        assert r.json()["sizeBytes"] == len(data)
        grown = _vm_hwm_kib(server.proc.pid) - before
        assert grown < 8 * 1024, f"peak RSS grew {grown} KiB for a {len(data)} byte upload"
        assert (box.inbox / r.json()["filename"]).stat().st_size == len(data)
    finally:
        server.ensure_stopped()


def test_startup_refuses_a_missing_inbox(tmp_path: Path) -> None:
    result = run_once(
        "upload-server",
        {
            "SMT_LOCAL_DIR": str(tmp_path / "missing"),
            "SMT_SPOOL_DIR": str(tmp_path / "spool"),
            "SMT_UPLOAD_STATE": str(tmp_path / "rl.db"),
        },
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_startup_refuses_bad_settings(tmp_path: Path) -> None:
    result = run_once("upload-server", {"SMT_LOCAL_DIR": str(tmp_path), "SMT_UPLOAD_PORT": "x"})
    assert result.returncode == 2
    assert "SMT_UPLOAD_PORT" in result.stderr
    result = run_once("upload-server", {})
    assert result.returncode == 2 and "SMT_LOCAL_DIR" in result.stderr


def test_sniffer() -> None:
    assert looks_like_csv(b"\xef\xbb\xbfa,b\r\n1,2", at_eof=True) == (True, "")
    assert looks_like_csv(b"a,b", at_eof=True)[0] is True
    assert looks_like_csv(b"a,b" * 5000, at_eof=False)[0] is False
    assert looks_like_csv(b"\xff\xfea,b\n", at_eof=True)[0] is False
    assert looks_like_csv(b"a,\x1bb\n", at_eof=True)[0] is False


# -- end to end with the real ingest pass ---------------------------------------------------------


def test_upload_then_ingest_pass_posts_it_and_a_reupload_is_a_duplicate(
    tmp_path: Path, webapp, smt_csv
) -> None:
    """Upload server → spool → ``smt-droplet ingest --no-sync`` → the web-app double → ledger."""
    box = Box(tmp_path)
    server = box.start()
    try:
        data = smt_csv(esiid="10443720004529147", days=1, seed=3)
        r = upload(server, data, name="my export.csv", fields={"meter": "M7"})
        assert r.status_code == 202, r.text
        stored = r.json()["filename"]
        ingest_env = {
            "ADMIN_TOKEN": webapp.admin_token,
            "INTELLIWATT_BASE_URL": webapp.url,
            "SMT_LOCAL_DIR": str(box.inbox),
            "SMT_SPOOL_DIR": str(box.spool),
            "SMT_HTTP_TIMEOUT": "10",
        }
        result = run_once("ingest", ingest_env, extra_args=("--no-sync",), timeout=60)
        assert result.returncode == 0, result.stderr
        (posted,) = webapp.received()
        assert posted["filename"] == stored
        assert posted["esiid"] == "10443720004529147"
        assert posted["meter"] == "M7"  # the upload's meter field, via the spool request
        assert posted["sha256"] == r.json()["sha256"]
        assert box.queued() == []  # the pass consumed the upload's request
        again = upload(server, data, name="copy.csv")
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert box.queued() == [] and len([n for n in box.inbox_names() if n.endswith(".csv")]) == 1
    finally:
        server.ensure_stopped()


def test_a_corrupt_limiter_makes_health_503(box: Box, server: ServerProcess) -> None:
    """/health said ok while every upload failed with 503: it checks the limiter now."""
    db = Path(box.env["SMT_UPLOAD_STATE"])
    for path in db.parent.glob(db.name + "*"):
        path.write_bytes(b"this is not a database" * 512)
    r = requests.get(server.url("/health"), timeout=5)
    assert r.status_code == 503
    assert r.json() == {
        "ok": False,
        "service": "smt-upload",
        "reason": "the droplet needs attention",
    }
    r = requests.get(server.url("/health"), headers={"x-smt-upload-token": TOKEN}, timeout=5)
    assert r.status_code == 503 and r.json()["checks"]["limiter"] is False
    assert r.json()["reason"] == "limiter check failed"
    assert upload(server, csv_bytes(1)).status_code == 503


def test_an_armored_pgp_upload_is_refused_and_nothing_is_stored(
    box: Box, server: ServerProcess
) -> None:
    for armored in (
        b"-----BEGIN PGP MESSAGE-----,x\n\nhQEMA0123\n-----END PGP MESSAGE-----\n",
        b"\xef\xbb\xbf  -----BEGIN PGP MESSAGE-----, Version: 2\na,b\n",
    ):  # first lines that pass the CSV sniff (a comma), then the armor check refuses them
        r = upload(server, armored, name="IntervalMeterUsage_10443720000000099.csv")
        assert r.status_code == 415 and r.json()["error"] == "pgp_not_accepted", r.text
    assert box.inbox_names() == [] and box.queued() == []


def test_ignored_fields_count_against_the_body_cap(box: Box, server: ServerProcess) -> None:
    """12 MB of ignored, chunked form fields used to pass a 200 KB cap."""

    def body():
        boundary = "b0undary"
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '.encode()
        yield b'filename="u.csv"\r\nContent-Type: text/csv\r\n\r\n' + csv_bytes(3) + b"\r\n"
        for i in range(200):  # 200 ignored fields of 60 KB each, sent chunked
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="x{i}"\r\n\r\n'.encode()
            yield b"z" * 60_000 + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    r = requests.post(
        server.url("/upload"),
        data=body(),
        headers={
            "x-smt-upload-token": TOKEN,
            "content-type": "multipart/form-data; boundary=b0undary",
        },
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"] == "body_too_large", r.text
    assert box.inbox_names() == [] and box.queued() == []


def test_the_free_space_guard_counts_uploads_in_flight(tmp_path: Path) -> None:
    """Stalled uploads hold the space they declared: a third one that would fit alone but not
    beside them is 507 at once; once they are gone it fits again."""
    import shutil
    import socket

    free = shutil.disk_usage(tmp_path).free
    declared = 40 * 2**20
    floor_mb = (free - 100 * 2**20) // 2**20  # room for two declared uploads, not three
    b = Box(tmp_path, SMT_UPLOAD_MAX_BYTES=str(64 * 2**20), SMT_MIN_FREE_MB=str(floor_mb))
    server = b.start()
    head = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nx-smt-upload-token: {TOKEN}\r\n"
        "content-type: multipart/form-data; boundary=b\r\n"
        f"content-length: {declared}\r\n\r\n"
    ).encode()
    try:
        stalled = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(head + b"--b\r\n")
            stalled.append(sock)
        time.sleep(0.5)
        third = raw_request(server.port, head + b"--b\r\n")
        assert third.startswith(b"HTTP/1.1 507"), third[:200]
        for sock in stalled:
            sock.close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head + b"--b\r\n")
            sock.settimeout(1.0)
            with pytest.raises(TimeoutError):  # no 507: the server waits for the body
                sock.recv(4096)
    finally:
        server.ensure_stopped()


def test_uploads_in_flight_are_capped_for_all_clients_together(tmp_path: Path) -> None:
    import socket

    b = Box(tmp_path, SMT_UPLOAD_MAX_CONCURRENT="2")
    server = b.start()
    head = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nx-smt-upload-token: {TOKEN}\r\n"
        "content-type: multipart/form-data; boundary=b\r\ncontent-length: 100000\r\n\r\n"
    ).encode()
    try:
        stalled = []
        for source in ("127.0.0.2", "127.0.0.3"):  # two clients, one stalled upload each
            sock = socket.create_connection(
                ("127.0.0.1", server.port), timeout=10, source_address=(source, 0)
            )
            sock.sendall(head + b"--b\r\n")
            stalled.append(sock)
        time.sleep(0.5)
        third = raw_request(server.port, head + b"--b\r\n")
        assert third.startswith(b"HTTP/1.1 503"), third[:200]
        assert b"Retry-After: 10" in third and b'"busy"' in third
        for sock in stalled:
            sock.close()
        time.sleep(0.5)
        assert upload(server, b"ESIID,USAGE_DATE\n'10443720000000099,3/8/2025\n").status_code == 202
    finally:
        server.ensure_stopped()
