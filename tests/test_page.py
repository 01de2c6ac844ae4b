"""The operator page's server side: the page's headers, its JSON API (``/api/v1``) on the real
upload server, and the decisions it queues, applied by a real ingest pass (no browser here:
``test_browser.py`` drives the page in Chromium)."""

from __future__ import annotations

import json
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests
from helpers import fast_env, sha256
from serverproc import ServerProcess

from smt_droplet import coverage_chart, spool
from smt_droplet.config import InboxSettings
from smt_droplet.ingest import run_pass
from smt_droplet.ledger import Ledger
from smt_droplet.page import CSP, page_weight
from smt_droplet.status import format_report, status_report
from smt_droplet.tickets import mint

TOKEN = "page-api-token-for-tests-0123456789"
TICKET_SECRET = "page-api-ticket-secret-0123456789"
ESIID = "10443720000000033"
AUTH = {"x-smt-upload-token": TOKEN}


def admin_ticket(role: str = "admin") -> dict[str, str]:
    raw = mint(TICKET_SECRET, role, "ops@example.test", int(time.time()) + 600, 1_000_000)
    return {"x-smt-upload-ticket": raw}


@pytest.fixture
def env(ingest_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return fast_env(ingest_env, STATE_FILE=str(tmp_path / "posted_sha256"))


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path):
    proc = ServerProcess(
        "upload-server",
        {
            "SMT_LOCAL_DIR": env["SMT_LOCAL_DIR"],
            "SMT_SPOOL_DIR": env["SMT_SPOOL_DIR"],
            "STATE_FILE": env["STATE_FILE"],
            "SMT_UPLOAD_STATE": str(tmp_path / "ratelimit.sqlite3"),
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": "0",
            "SMT_UPLOAD_TOKEN": TOKEN,
            "SMT_UPLOAD_TICKET_SECRET": TICKET_SECRET,
            "SMT_UPLOAD_CORS_ORIGIN": "https://app.example.test",
            "SMT_SHUTDOWN_GRACE": "1",
        },
        tmp_path / "upload-server.log",
    ).start()
    yield proc
    proc.ensure_stopped()


def status_lines(env: dict[str, str]) -> list[str]:
    """What ``smt-droplet status`` prints for this inbox."""
    return format_report(status_report(InboxSettings.from_env(env)))


def api(server: ServerProcess, path: str, method: str = "get", **kw) -> requests.Response:
    kw.setdefault("headers", AUTH)
    return requests.request(method, server.url(f"/api/v1{path}"), timeout=10, **kw)


def test_page_is_a_static_shell_with_a_strict_policy(server: ServerProcess) -> None:
    page = requests.get(server.url("/"), timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "http" not in CSP
    assert page.headers["X-Frame-Options"] == "DENY"
    assert TOKEN not in page.text and "<script>" not in page.text  # no inline script, no secret
    for asset in ("page.js", "page.css"):
        got = requests.get(server.url(f"/assets/{asset}"), timeout=5)
        assert got.status_code == 200 and got.headers["Content-Security-Policy"] == CSP
        again = requests.get(
            server.url(f"/assets/{asset}"), headers={"If-None-Match": got.headers["ETag"]}
        )
        assert again.status_code == 304
    assert requests.get(server.url("/assets/index.html"), timeout=5).status_code == 404
    assert requests.get(server.url("/assets/..%2Fpage.py"), timeout=5).status_code == 404
    assert 0 < page_weight() < 64 * 1024
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing from elsewhere


def test_every_api_call_needs_an_admins_secret(server: ServerProcess) -> None:
    for headers in ({}, {"x-smt-upload-token": "wrong"}, admin_ticket("customer")):
        got = api(server, "/files", headers=headers)
        assert got.status_code == 401, headers
        assert got.json()["error"] == "unauthorized"
        assert got.headers["Cache-Control"] == "no-store"
    assert api(server, "/session").json()["kind"] == "token"
    assert api(server, "/session", headers=admin_ticket()).json()["kind"] == "ticket"
    # The app's origin may upload cross-origin, but the page's API is not for other origins.
    preflight = requests.options(
        server.url("/api/v1/files"),
        headers={"Origin": "https://app.example.test", "Access-Control-Request-Method": "GET"},
        timeout=5,
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers
    got = api(server, "/files", headers={**AUTH, "Origin": "https://app.example.test"})
    assert got.status_code == 200 and "Access-Control-Allow-Origin" not in got.headers
    assert TOKEN not in server.log()


def test_files_overview_and_coverage_follow_the_ledger(
    server: ServerProcess, env: dict[str, str], inbox: Path, smt_csv, webapp
) -> None:
    start = date.today() - timedelta(days=40)
    smt_csv.write(inbox / "adhocusage", esiid=ESIID, start=start, days=30)
    orphan = inbox / "orphan.csv"
    orphan.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    assert run_pass(env, sync=False).exit_code == 0

    files = api(server, "/files").json()
    assert files["matching"] == 2 and files["needs_operator"] == 1
    by_state = {row["state"]: row for row in files["files"]}
    posted = by_state["posted"]
    assert (posted["esiid"], posted["source"], posted["app_id"]) == (ESIID, "sftp", "1")
    assert posted["summary"]["intervals_present"] == posted["summary"]["intervals_expected"]
    assert by_state["no-esiid"]["path"] == "orphan.csv"
    only = api(server, "/files", params={"outcome": "no-esiid"}).json()["files"]
    assert [r["path"] for r in only] == ["orphan.csv"]
    assert api(server, "/files", params={"esiid": ESIID[:10]}).json()["matching"] == 1
    one = api(server, f"/files/{posted['sha256']}").json()
    assert one["state"] == "posted" and one["path"] == posted["path"]
    assert api(server, f"/files/{'0' * 64}").status_code == 404
    assert api(server, "/files/not-a-digest").status_code == 400
    assert api(server, f"/files/{posted['sha256']}", params={"path": "../x"}).status_code == 400

    overview = api(server, "/overview").json()
    assert overview["healthy"] is True and overview["lastPass"]["exit_code"] == 0
    assert overview["lastSuccess"] and overview["queueDepth"] == 0 and overview["freeBytes"] > 0

    coverage = api(server, "/coverage").json()["esiids"]
    assert coverage == [
        {
            "esiid": ESIID,
            "from": (date.today() - timedelta(days=89)).isoformat(),
            "days": 90,
            "complete": 30,
            "gaps": 0,
            "missing": 58,
            "due": 2,  # today and yesterday: SMT may not have delivered them yet
        }
    ]
    chart = api(server, f"/coverage/{ESIID}.svg")
    assert chart.headers["Content-Type"].startswith("image/svg+xml")
    assert chart.text.count('data-state="complete"') == 30
    assert api(server, "/coverage/10443720000000044.svg").status_code == 404


def test_decisions_are_queued_and_applied_by_the_next_pass(
    server: ServerProcess, env: dict[str, str], inbox: Path, webapp
) -> None:
    (inbox / "a.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    (inbox / "b.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/9/2025,2.0\n")
    run_pass(env, sync=False)
    a, b = sha256(inbox / "a.csv"), sha256(inbox / "b.csv")

    assert api(server, f"/files/{a}/ignore", "post", json={}).json()["error"] == "reason_required"
    bad = api(server, f"/files/{b}/post", "post", json={"esiid": "123"})
    assert bad.status_code == 400
    assert api(server, f"/files/{b}/post", "post", json={}).json()["error"] == "esiid_required"
    assert api(server, f"/files/{b}/post", "post", data=b"[").status_code == 400
    assert api(server, f"/files/{'1' * 64}/forget", "post", json={}).status_code == 404
    assert spool.depth(Path(env["SMT_SPOOL_DIR"])) == 0  # nothing refused was queued

    ignored = api(
        server,
        f"/files/{a}/ignore",
        "post",
        json={"reason": "a  test\nexport"},
        headers=admin_ticket(),  # the decision names who made it: the ticket's account
    )
    assert ignored.status_code == 202
    request_id = ignored.json()["id"]
    assert api(server, f"/requests/{request_id}").json()["served"] is False
    posted = api(server, f"/files/{b}/post", "post", json={"esiid": ESIID, "meter": "M7"})
    assert posted.status_code == 202
    assert len(webapp.requests()) == 0  # the server itself never posts nor writes the ledger

    result = run_pass(env, sync=False)  # what the path unit starts
    assert result.exit_code == 0
    assert api(server, f"/requests/{request_id}").json()["served"] is True
    rows = {r["path"]: r for r in api(server, "/files").json()["files"]}
    assert (rows["a.csv"]["state"], rows["a.csv"]["reason"]) == ("ignored", "a test export")
    assert (rows["b.csv"]["state"], rows["b.csv"]["esiid"], rows["b.csv"]["meter"]) == (
        "posted",
        ESIID,
        "M7",
    )
    assert Ledger.load(Path(env["STATE_FILE"])).outcomes[a]["by"] == "page (ops@example.test)"

    # A posted file cannot be ignored (the request is dropped with a warning); forget lifts
    # the ledger's record: b has no ESIID of its own, so it waits as no-esiid again.
    assert api(server, f"/files/{b}/ignore", "post", json={"reason": "late"}).status_code == 202
    assert api(server, f"/files/{b}/forget", "post", json={}).status_code == 202
    run_pass(env, sync=False)
    assert api(server, f"/files/{b}").json()["state"] == "no-esiid"
    assert len(webapp.received()) == 1


def test_a_file_that_keeps_failing_shows_its_reason_everywhere(
    server: ServerProcess, env: dict[str, str], inbox: Path, smt_csv, webapp
) -> None:
    path = smt_csv.write(inbox, esiid=ESIID)
    webapp.fail_next(4, 502)  # every attempt of the pass: 1 + SMT_POST_RETRIES (3)
    result = run_pass(fast_env(env), sync=False)
    assert result.exit_code == 1 and result.counts() == {"failed-will-retry": 1}
    row = api(server, f"/files/{sha256(path)}").json()
    assert row["state"] == "failed-will-retry", row
    assert row["reason"] == (
        "HTTP 502 STORAGE_FAILED (after 4 attempts); the next pass tries again"
    )
    assert (row["esiid"], row["at"] is not None) == (ESIID, True)
    # the tries it took and when the next one comes (the timer's next run; off systemd, unknown)
    assert (row["attempts"], row["next_try"]) == (4, None)
    only = api(server, "/files", params={"outcome": "failed-will-retry"}).json()["files"]
    assert [r["path"] for r in only] == [path.name]
    assert only[0]["attempts"] == 4 and "next_try" in only[0]
    text = status_lines(env)
    assert any("failed-will-retry" in ln and "next-try=the next pass" in ln for ln in text), text
    last = api(server, "/overview").json()["lastPass"]
    assert (last["failed"], last["posted"], last["exit_code"]) == (1, 0, 1)
    assert run_pass(fast_env(env), sync=False).counts() == {"posted": 1}  # retried, not settled
    assert api(server, f"/files/{sha256(path)}").json()["state"] == "posted"
    assert api(server, "/overview").json()["lastPass"]["posted"] == 1


def test_decisions_only_for_files_the_droplet_holds_and_an_esiid_decision_lasts(
    server: ServerProcess, env: dict[str, str], inbox: Path, webapp
) -> None:
    orphan = inbox / "orphan.csv"
    orphan.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    later = b"USAGE_DATE,USAGE_KWH\n3/9/2025,2.0\n"  # bytes SFTP will deliver later
    unseen = sha256(later)
    assert api(server, f"/files/{unseen}/ignore", "post", json={"reason": "x"}).status_code == 404
    assert api(server, f"/files/{unseen}/forget", "post", json={}).status_code == 404
    # a forged request for those bytes (the spool is shared) is dropped by the pass too
    spool.enqueue(
        Path(env["SMT_SPOOL_DIR"]),
        "page",
        reason="forged",
        extra={"action": "ignore", "sha256": unseen, "by": "page"},
    )
    assert run_pass(fast_env(env), sync=False).counts() == {"no-esiid": 1}
    (inbox / "later.csv").write_bytes(later)
    assert run_pass(fast_env(env), sync=False).counts()["no-esiid"] == 2  # not "ignored"

    decided = api(server, f"/files/{sha256(orphan)}/post", "post", json={"esiid": ESIID})
    assert decided.status_code == 202
    webapp.fail_next(4, 500)  # the first pass after the decision cannot post
    first = run_pass(fast_env(env), sync=False)
    assert first.counts()["failed-will-retry"] == 1
    assert api(server, f"/files/{sha256(orphan)}").json()["esiid"] == ESIID
    second = run_pass(fast_env(env), sync=False)  # no request any more: the decision lasts
    assert second.counts()["posted"] == 1
    assert [r["esiid"] for r in webapp.posted()] == [ESIID]


def test_coverage_counts_complete_partial_and_missing_days() -> None:
    today = date(2026, 3, 10)
    records = [
        {"esiid": ESIID, "summary": {"first_day": "2026-03-01", "last_day": "2026-03-05"}},
        {
            "esiid": ESIID,
            "summary": {
                "first_day": "2026-03-05",
                "last_day": "2026-03-08",
                "gap_days": {"2026-03-07": 90, "2026-03-08": 12},
            },
        },
        {"esiid": ESIID, "summary": {"first_day": "2026-03-08", "last_day": "2026-03-08"}},
        {"esiid": None, "summary": {"first_day": "2026-03-01", "last_day": "2026-03-09"}},
        {"esiid": "x", "summary": "not a mapping"},
    ]
    cov = coverage_chart.coverage(records, today, days=10)
    assert list(cov) == [ESIID]
    c = cov[ESIID]
    # 03-01..03-06 complete, 03-07 gaps, 03-08 complete (a later file filled it), 09/10 (today
    # and yesterday) not due yet
    assert c.states == ["complete"] * 6 + ["gaps", "complete", "due", "due"]
    assert c.to_dict() | {"from": None} == {
        "esiid": ESIID,
        "from": None,
        "days": 10,
        "complete": 7,
        "gaps": 1,
        "missing": 0,
        "due": 2,
    }
    later = coverage_chart.coverage(records, today + timedelta(days=2), days=12)[ESIID]
    assert later.states[-4:] == ["missing", "missing", "due", "due"]
    drawn = coverage_chart.svg(c)
    assert drawn.count("<rect") == 10 and 'aria-label="ESIID ' in drawn
    assert "2026-03-07: gaps" in drawn


def test_coverage_svg_escapes_what_it_is_given() -> None:
    c = coverage_chart.Coverage('<script>"x"</script>', date(2026, 1, 1), ["missing"])
    drawn = coverage_chart.svg(c)
    assert "<script>" not in drawn and "&lt;script&gt;" in drawn
    json.dumps(c.to_dict())
