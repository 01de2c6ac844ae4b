"""The webhook, started for real (``python -m smt_droplet webhook-server``) on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import signal
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from serverproc import ServerProcess, raw_request, run_once

from smt_droplet import spool
from smt_droplet.signatures import sign, sign_standard
from smt_droplet.webhook import Trigger, TriggerError, parse_trigger

SECRET = "webhook-secret-for-tests"
ESIID = "10443720004529147"


class Hook:
    def __init__(self, root: Path, **extra: str) -> None:
        self.root = root
        self.spool = root / "spool"
        self.env = {
            "INTELLIWATT_WEBHOOK_SECRET": SECRET,
            "SMT_SPOOL_DIR": str(self.spool),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": "0",
            "SMT_SHUTDOWN_GRACE": "1",
            "SMT_WEBHOOK_STATE": str(root / "webhook-state" / "replay.sqlite3"),
        }
        self.env.update(extra)
        self.servers: list[ServerProcess] = []

    def start(self) -> ServerProcess:
        server = ServerProcess("webhook-server", self.env, self.root / "webhook.log").start()
        self.servers.append(server)
        return server

    def queued(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.spool / "queue").glob("*.json"))]


@pytest.fixture
def hook(tmp_path: Path):
    h = Hook(tmp_path)
    yield h
    for server in h.servers:
        server.ensure_stopped()


@pytest.fixture
def server(hook: Hook) -> ServerProcess:
    return hook.start()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """One webhook for the many parametrized cases; tests compare the queue before/after."""
    h = Hook(tmp_path_factory.mktemp("shared-webhook"), SMT_WEBHOOK_MAX_QUEUED="100000")
    h.start()
    yield h
    for server in h.servers:
        server.ensure_stopped()


def trigger(
    server: ServerProcess,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    h = {"x-intelliwatt-secret": SECRET} if headers is None else headers
    if isinstance(body, dict):
        return requests.post(server.url("/trigger/smt-now"), json=body, headers=h, timeout=10)
    return requests.post(server.url("/trigger/smt-now"), data=body, headers=h, timeout=10)


# -- accepted calls -------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret"])
def test_each_secret_header_queues_exactly_one_request(shared: Hook, header: str) -> None:
    hook, server = shared, shared.servers[0]
    before = {q["id"] for q in hook.queued()}
    started = time.monotonic()
    r = trigger(
        server,
        {"reason": "manual", "esiid": ESIID, "meter": "M1", "forceRepost": True, "x": 1},
        headers={header: SECRET},
    )
    assert time.monotonic() - started < 1.0
    assert r.status_code == 202
    body = r.json()
    assert body["ok"] is True and body["queued"] is True and body["id"]
    (request,) = [q for q in hook.queued() if q["id"] not in before]
    assert request["id"] == body["id"] and request["kind"] == "webhook"
    assert request["esiid"] == ESIID and request["meter"] == "M1"
    assert request["force_repost"] is True and request["reason"] == "manual"
    assert "x" not in request and "x" not in request["extra"]
    assert not list((hook.spool / "tmp").iterdir())  # nothing half-written
    log = server.log()
    assert "POST /trigger/smt-now 202" in log and f"outcome=queued:{body['id']}" in log
    assert SECRET not in log


def test_empty_body_is_a_plain_trigger(hook: Hook, server: ServerProcess) -> None:
    r = trigger(server, None)
    assert r.status_code == 202
    (request,) = hook.queued()
    assert request["esiid"] is None and request["force_repost"] is False


def test_n_accepted_calls_queue_n_requests(hook: Hook, server: ServerProcess) -> None:
    results: list[int] = []

    def call(i: int) -> None:
        results.append(trigger(server, {"reason": f"r{i}"}).status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [202] * 10
    queued = hook.queued()
    assert len(queued) == 10
    assert sorted(q["reason"] for q in queued) == sorted(f"r{i}" for i in range(10))


# -- rejected calls queue nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-intelliwatt-secret": ""},
        {"x-intelliwatt-secret": "wrong"},
        {"x-smt-secret": SECRET + "x"},
        {"x-webhook-secret": SECRET[:-1]},
        {"x-admin-token": SECRET},
        {"authorization": f"Bearer {SECRET}"},
    ],
)
def test_wrong_or_missing_secret_is_401(shared: Hook, headers: dict[str, str]) -> None:
    hook, server = shared, shared.servers[0]
    before = hook.queued()
    r = trigger(server, {"esiid": ESIID}, headers=headers)
    assert r.status_code == 401
    assert r.json()["ok"] is False and r.json()["error"] == "unauthorized"
    assert hook.queued() == before


def test_one_right_header_among_wrong_ones_is_enough(hook: Hook, server: ServerProcess) -> None:
    r = trigger(server, None, headers={"x-intelliwatt-secret": "nope", "x-webhook-secret": SECRET})
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b'"text"', "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b"[" * 5000 + b"]" * 5000, "bad_json"),
        (b'{"esiid": "1044372000452914"}', "bad_esiid"),
        (b'{"esiid": "104437200045291478"}', "bad_esiid"),
        (b'{"esiid": "1044372000452914x"}', "bad_esiid"),
        (b'{"esiid": true}', "bad_esiid"),
        (b'{"esiid": ["10443720004529147"]}', "bad_esiid"),
        (b'{"meter": "M1; rm -rf /"}', "bad_meter"),
        (b'{"forceRepost": "yes"}', "bad_force_repost"),
        (b'{"reason": 5}', "bad_reason"),
    ],
)
def test_bad_bodies_are_400_and_queue_nothing(shared: Hook, body: bytes, error: str) -> None:
    hook, server = shared, shared.servers[0]
    before = hook.queued()
    r = trigger(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == error
    assert hook.queued() == before


def test_body_over_64_kib_is_413(hook: Hook, server: ServerProcess) -> None:
    big = json.dumps({"reason": "x" * (64 * 1024)}).encode()
    r = trigger(server, big)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # chunked, no Content-Length: the server counts while reading
        for _ in range(100):
            yield b" " * 4096

    r = requests.post(
        server.url("/trigger/smt-now"),
        data=chunks(),
        headers={"x-smt-secret": SECRET},
        timeout=10,
    )
    assert r.status_code == 413
    # A declared 10 MB body is refused from the header, without reading it.
    head = (
        f"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\nx-smt-secret: {SECRET}\r\n"
        "Content-Length: 10000000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = raw_request(server.port, head, b"{")
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - started < 2
    assert hook.queued() == []
    # Exactly 64 KiB is still fine.
    exact = b'{"reason": "' + b"y" * (64 * 1024 - 14) + b'"}'
    assert len(exact) == 64 * 1024
    assert trigger(server, exact).status_code == 202


def test_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    hook = Hook(tmp_path, SMT_WEBHOOK_MAX_QUEUED="2", SMT_WEBHOOK_RETRY_AFTER="7")
    server = hook.start()
    try:
        assert trigger(server).status_code == 202
        assert trigger(server).status_code == 202
        r = trigger(server)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "7"
        assert r.json()["error"] == "queue_full" and r.json()["queued"] == 2
        assert len(hook.queued()) == 2
        # The ingest pass claims the queue: room again.
        claimed = spool.claim(hook.spool)
        assert len(claimed) == 2
        assert trigger(server).status_code == 202
    finally:
        server.ensure_stopped()


def test_health_reports_queue_depth_and_last_ingest(hook: Hook, server: ServerProcess) -> None:
    r = requests.get(server.url("/health"), timeout=5)
    assert r.status_code == 200
    assert r.json() == {"ok": True, "service": "smt-webhook"}  # details need the secret
    auth = {"x-smt-secret": SECRET}
    r = requests.get(server.url("/health"), headers=auth, timeout=5)
    assert r.json() == {
        "ok": True,
        "service": "smt-webhook",
        "queueDepth": 0,
        "lastIngest": None,
        "checks": {"spool": True, "disk": True, "ingest": True},
    }
    assert r.headers["Cache-Control"] == "no-store"  # what the secret shows is never cached
    trigger(server)
    spool.write_last_result(hook.spool, {"exit_code": 0, "posted": 3})
    r = requests.get(server.url("/health"), headers=auth, timeout=5)
    assert r.json()["queueDepth"] == 1
    assert r.json()["lastIngest"] == {"exit_code": 0, "posted": 3}
    assert requests.get(server.url("/trigger/smt-now"), timeout=5).status_code == 405
    assert requests.post(server.url("/other"), timeout=5).status_code == 404


def test_health_degrades_when_the_last_pass_failed_or_success_is_stale(
    hook: Hook, server: ServerProcess
) -> None:
    auth = {"x-smt-secret": SECRET}
    now = time.time()
    spool.write_last_result(hook.spool, {"exit_code": 1, "last_success_ts": now - 60})
    r = requests.get(server.url("/health"), timeout=5)
    assert r.status_code == 503
    assert r.json() == {
        "ok": False,
        "service": "smt-webhook",
        "reason": "the droplet needs attention",
    }
    r = requests.get(server.url("/health"), headers=auth, timeout=5)
    assert r.status_code == 503 and r.json()["reason"] == "the last ingest pass failed (exit 1)"
    spool.write_last_result(hook.spool, {"exit_code": 0, "last_success_ts": now - 4 * 3600})
    r = requests.get(server.url("/health"), headers=auth, timeout=5)
    assert r.status_code == 503 and r.json()["reason"] == "no successful ingest pass for 4.0 h"
    spool.write_last_result(hook.spool, {"exit_code": 0, "last_success_ts": now})
    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    # the last pass stopped downloading below the free-space guard: the disk is full
    full = {"exit_code": 1, "last_success_ts": now, "skipped_no_space": 2}
    spool.write_last_result(hook.spool, full)
    r = requests.get(server.url("/health"), headers=auth, timeout=5)
    assert r.status_code == 503 and r.json()["checks"]["disk"] is False
    assert r.json()["reason"].startswith("disk check failed")


# -- signatures -----------------------------------------------------------------------------------


def signed_headers(body: bytes, when: float | None = None) -> dict[str, str]:
    stamp = str(int(time.time() if when is None else when))
    return {"x-smt-timestamp": stamp, "x-smt-signature": sign(SECRET, stamp, body)}


def test_signature_mode_accept(tmp_path: Path) -> None:
    hook = Hook(tmp_path, SMT_WEBHOOK_SIGNATURE="accept", SMT_WEBHOOK_SIGNATURE_WINDOW="60")
    server = hook.start()
    try:
        body = json.dumps({"esiid": ESIID}).encode()
        assert trigger(server, body, headers=signed_headers(body)).status_code == 202
        stale = signed_headers(body, time.time() - 120)
        assert trigger(server, body, headers=stale).status_code == 401
        tampered = signed_headers(body)
        assert trigger(server, body + b" ", headers=tampered).status_code == 401
        assert trigger(server, body, headers={"x-smt-secret": SECRET}).status_code == 202
        assert trigger(server, body, headers={}).status_code == 401
        assert len(hook.queued()) == 2
    finally:
        server.ensure_stopped()


def test_signature_mode_require_refuses_the_bare_secret(tmp_path: Path) -> None:
    hook = Hook(tmp_path, SMT_WEBHOOK_SIGNATURE="require")
    server = hook.start()
    try:
        body = b"{}"
        assert trigger(server, body, headers={"x-smt-secret": SECRET}).status_code == 401
        assert trigger(server, body, headers=signed_headers(body)).status_code == 202
        assert len(hook.queued()) == 1
    finally:
        server.ensure_stopped()


def test_a_captured_signed_request_is_accepted_once_even_across_a_restart(
    tmp_path: Path,
) -> None:
    hook = Hook(tmp_path, SMT_WEBHOOK_SIGNATURE="require")
    server = hook.start()
    body = json.dumps({"reason": "pull"}).encode()
    captured = signed_headers(body)
    try:
        codes = [trigger(server, body, headers=captured).status_code for _ in range(7)]
        assert codes == [202] + [409] * 6
    finally:
        server.ensure_stopped()
    server = hook.start()  # the memory is on disk
    try:
        assert trigger(server, body, headers=captured).status_code == 409
        assert trigger(server, body, headers=signed_headers(body)).status_code in (202, 409)
    finally:
        server.ensure_stopped()
    assert 1 <= len(hook.queued()) <= 2  # a fresh signature in the same second is the same one


@pytest.mark.parametrize(
    ("stamp", "status"),
    [
        ("nan", 401),
        ("inf", 401),
        ("-5", 401),
        ("1e9", 401),
        ("", 401),
        (299, 401),  # an int is an offset from now: 299 s ahead of the server's clock
        (30, 202),
        (-299, 202),
        (-301, 401),
    ],
)
def test_timestamps_must_be_finite_integers_inside_the_window(
    shared_signed: Hook, stamp: str | int, status: int
) -> None:
    server = shared_signed.servers[0]
    body = json.dumps({"reason": f"stamp {stamp}"}).encode()
    value = str(int(time.time()) + stamp) if isinstance(stamp, int) else stamp
    headers = {"x-smt-timestamp": value, "x-smt-signature": sign(SECRET, value, body)}
    assert trigger(server, body, headers=headers).status_code == status


@pytest.fixture(scope="module")
def shared_signed(tmp_path_factory: pytest.TempPathFactory):
    hook = Hook(tmp_path_factory.mktemp("signed"), SMT_WEBHOOK_SIGNATURE="require")
    hook.start()
    yield hook
    for server in hook.servers:
        server.ensure_stopped()


def standard_headers(secret: str, msg_id: str, body: bytes, *extra: str) -> dict[str, str]:
    stamp = str(int(time.time()))
    signatures = " ".join([*extra, sign_standard(secret, msg_id, stamp, body)])
    return {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signatures}


def test_standard_webhooks_signatures_with_rotation(tmp_path: Path) -> None:
    current = "whsec_" + base64.b64encode(b"current-key-32-bytes-long-enough!").decode()
    previous = "whsec_" + base64.b64encode(b"previous-key-32-bytes-long-enough").decode()
    hook = Hook(
        tmp_path,
        SMT_WEBHOOK_SIGNATURE="require",
        INTELLIWATT_WEBHOOK_SECRET=current,
        INTELLIWATT_WEBHOOK_SECRET_PREVIOUS=previous,
    )
    server = hook.start()
    body = json.dumps({"esiid": ESIID}).encode()
    try:
        assert (
            trigger(server, body, headers=standard_headers(current, "msg_1", body)).status_code
            == 202
        )
        # the sender still signs with the old secret during the rotation, plus a bogus entry
        old = standard_headers(previous, "msg_2", body, "v1,AAAA")
        assert trigger(server, body, headers=old).status_code == 202
        assert trigger(server, body, headers=old).status_code == 409  # same webhook-id
        wrong = standard_headers("whsec_" + base64.b64encode(b"x" * 32).decode(), "msg_3", body)
        assert trigger(server, body, headers=wrong).status_code == 401
        tampered = standard_headers(current, "msg_4", body)
        assert trigger(server, body + b" ", headers=tampered).status_code == 401
        # the id is signed: a captured signature under a new id is refused
        moved = {**standard_headers(current, "msg_5", body), "webhook-id": "msg_6"}
        assert trigger(server, body, headers=moved).status_code == 401
    finally:
        server.ensure_stopped()
    assert len(hook.queued()) == 2


def test_the_queue_cap_holds_under_concurrent_triggers(tmp_path: Path) -> None:
    hook = Hook(tmp_path, SMT_WEBHOOK_MAX_QUEUED="20", SMT_HTTP_MAX_PER_CLIENT="512")
    server = hook.start()
    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            codes = list(pool.map(lambda _: trigger(server, b"").status_code, range(400)))
    finally:
        server.ensure_stopped()
    assert codes.count(202) == 20 and codes.count(429) == 380
    assert len(hook.queued()) == 20


# -- startup and shutdown -------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "   "])
def test_refuses_to_start_without_a_secret(tmp_path: Path, secret: str | None) -> None:
    env = {"SMT_SPOOL_DIR": str(tmp_path / "spool"), "SMT_WEBHOOK_PORT": "0"}
    if secret is not None:
        env["INTELLIWATT_WEBHOOK_SECRET"] = secret
    result = run_once("webhook-server", env)
    assert result.returncode == 2
    assert "INTELLIWATT_WEBHOOK_SECRET" in result.stderr
    assert "refuses to start" in result.stderr


def test_alias_secret_name_works(tmp_path: Path) -> None:
    hook = Hook(tmp_path)
    del hook.env["INTELLIWATT_WEBHOOK_SECRET"]
    hook.env["DROPLET_WEBHOOK_SECRET"] = SECRET
    server = hook.start()
    try:
        assert trigger(server).status_code == 202
    finally:
        server.ensure_stopped()


def test_settings_from_an_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(
        "# the droplet's env file\r\n"
        f'INTELLIWATT_WEBHOOK_SECRET="{SECRET}"\r\n'
        f"SMT_SPOOL_DIR={tmp_path / 'spool-from-file'}\r\n"
        "SMT_WEBHOOK_BIND=127.0.0.1\r\nSMT_WEBHOOK_PORT=0\r\n"
    )
    server = ServerProcess(
        "webhook-server", {}, tmp_path / "envfile.log", args=("--env-file", str(env_file))
    ).start()
    try:
        assert trigger(server).status_code == 202
        assert len(list((tmp_path / "spool-from-file" / "queue").glob("*.json"))) == 1
    finally:
        server.ensure_stopped()


def test_shell_syntax_in_a_request_stays_data(hook: Hook, server: ServerProcess) -> None:
    """Command substitutions in every free-text place of a trigger (body, headers, query) are
    queued as plain JSON text and never run: the marker files they would create stay absent."""
    marker = hook.spool.parent / "pwned"
    payloads = [f"$(touch {marker}1)", f"`touch {marker}2`", f"; touch {marker}3 #", "|id"]
    for n, payload in enumerate(payloads):
        r = requests.post(
            server.url(f"/trigger/smt-now?x={payload}"),
            json={"reason": payload, "meter": "M1"},
            headers={
                "x-intelliwatt-secret": SECRET,
                "x-request-id": payload,
                "user-agent": payload,
            },
            timeout=10,
        )
        assert r.status_code == 202, (n, r.text)
    reasons = sorted(q["reason"] for q in hook.queued())
    assert reasons == sorted(payloads)
    time.sleep(0.2)  # anything spawned in the background would have run by now
    assert sorted(p.name for p in marker.parent.glob("pwned*")) == []


def test_sigterm_exits_0_and_logs_the_start_line(hook: Hook, server: ServerProcess) -> None:
    log = server.log()
    assert "webhook-server listening on http://127.0.0.1:" in log
    assert f"spool={hook.spool}" in log
    assert SECRET not in log
    assert server.stop(signal.SIGTERM) == 0
    assert "webhook-server stopped" in server.log()


def test_sigterm_with_an_idle_keep_alive_connection_is_quick(
    hook: Hook, server: ServerProcess
) -> None:
    with requests.Session() as session:
        r = session.get(server.url("/health"), timeout=5)
        assert r.status_code == 200 and r.headers.get("Connection", "").lower() != "close"
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 3


def test_help_lists_the_server_commands() -> None:
    result = run_once("--help", {})
    assert result.returncode == 0
    assert "webhook-server" in result.stdout and "upload-server" in result.stdout


# -- property tests of the body validation -------------------------------------------------------

esiids = st.text(alphabet=string.digits, min_size=17, max_size=17)
meters = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    esiid=st.none() | esiids,
    meter=st.none() | meters,
    force=st.none() | st.booleans(),
    reason=st.none() | st.text(max_size=300),
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("esiid", "meter", "forceRepost", "reason")),
        json_values,
        max_size=4,
    ),
    quote=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_valid_bodies_round_trip(
    esiid: str | None,
    meter: str | None,
    force: bool | None,
    reason: str | None,
    extra: dict,
    quote: bool,
) -> None:
    doc = dict(extra)
    if esiid is not None:
        doc["esiid"] = f"'{esiid}" if quote else esiid
    if meter is not None:
        doc["meter"] = meter
    if force is not None:
        doc["forceRepost"] = force
    if reason is not None:
        doc["reason"] = reason
    result = parse_trigger(json.dumps(doc).encode())
    assert result.esiid == esiid
    assert result.meter == meter
    assert result.force_repost is bool(force)
    if reason is None or reason.strip() == "":
        assert result.reason is None
    else:
        assert result.reason is not None and len(result.reason) <= 200
        assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in result.reason)


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_either_parse_or_fail_with_a_code(body: bytes) -> None:
    try:
        result = parse_trigger(body)
    except TriggerError as exc:
        assert exc.code in {"bad_json", "bad_esiid", "bad_meter", "bad_force_repost", "bad_reason"}
    else:
        assert isinstance(result, Trigger)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_never_escapes_validation(value: object) -> None:
    try:
        result = parse_trigger(json.dumps({"esiid": value, "meter": value}).encode())
    except TriggerError:
        return
    assert result.esiid is None or (len(result.esiid) == 17 and result.esiid.isdigit())
    assert result.meter is None or (1 <= len(result.meter) <= 32)


def _looks_valid(s: str) -> bool:
    core = s.strip("' \t\n\r\x0b\x0c")
    return len(core) == 17 and core.isascii() and core.isdigit()


@given(st.text(max_size=30).filter(lambda s: not _looks_valid(s)))
@settings(max_examples=300, deadline=None)
def test_anything_but_17_digits_is_a_bad_esiid(value: str) -> None:
    if value.strip() == "":
        assert parse_trigger(json.dumps({"esiid": value}).encode()).esiid is None
        return
    with pytest.raises(TriggerError) as info:
        parse_trigger(json.dumps({"esiid": value}).encode())
    assert info.value.code == "bad_esiid"


# -- end to end with the real ingest pass ---------------------------------------------------------


def test_force_repost_trigger_makes_the_next_pass_repost(
    tmp_path: Path, webapp, smt_csv, inbox: Path
) -> None:
    """webhook → spool → ``smt-droplet ingest --no-sync`` honours ``forceRepost``."""
    hook = Hook(tmp_path)
    server = hook.start()
    try:
        smt_csv.write(inbox, esiid="10443720004529147", seed=5)
        env = {
            "ADMIN_TOKEN": webapp.admin_token,
            "INTELLIWATT_BASE_URL": webapp.url,
            "SMT_LOCAL_DIR": str(inbox),
            "SMT_SPOOL_DIR": str(hook.spool),
            "SMT_HTTP_TIMEOUT": "10",
        }

        def ingest() -> None:
            result = run_once("ingest", env, extra_args=("--no-sync",), timeout=60)
            assert result.returncode == 0, result.stderr

        ingest()
        assert len(webapp.received()) == 1
        assert trigger(server, {"reason": "plain"}).status_code == 202
        ingest()
        assert len(webapp.received()) == 1  # already in the ledger: not posted again
        assert trigger(server, {"reason": "again", "forceRepost": True}).status_code == 202
        ingest()
        assert len(webapp.received()) == 2
        assert hook.queued() == []
    finally:
        server.ensure_stopped()


def test_stalled_unauthenticated_bodies_take_no_queue_slot_and_abort_quietly(
    tmp_path: Path,
) -> None:
    """Anyone can send a ``webhook-signature`` header and then stall: such a body is read (under
    SMT_WEBHOOK_BODY_TIMEOUT) and verified before a queue slot is taken, so real triggers still
    queue; a stall that times out is a 408, one that the client aborts one line, no traceback."""
    import socket

    h = Hook(
        tmp_path,
        SMT_WEBHOOK_SIGNATURE="accept",
        SMT_WEBHOOK_MAX_QUEUED="3",
        SMT_WEBHOOK_BODY_TIMEOUT="2",
    )
    server = h.start()
    try:
        head = (
            b"POST /trigger/smt-now HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"webhook-id: msg_1\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,AAAA\r\n"
            b"content-length: 100\r\n\r\n"
        )
        stalls = []
        for _ in range(20):  # more than the queue's 3 slots; the body never comes
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(head + b"{")
            stalls.append(sock)
        time.sleep(0.3)
        for _ in range(3):  # while they stall, real triggers fill the queue as usual
            assert trigger(server).status_code == 202
        assert trigger(server).status_code == 429  # the cap counts real requests only
        for sock in stalls[:10]:  # half go away mid-body
            sock.close()
        answers = []
        for sock in stalls[10:]:  # the rest get their 408 after the body timeout
            answers.append(sock.recv(4096))
            sock.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
        time.sleep(0.3)
        log = server.log()
        assert "Traceback" not in log and "Error handling request" not in log
        assert len(h.queued()) == 3
    finally:
        server.ensure_stopped()
