"""The operator page and the app's cross-origin upload, in headless Chromium (Debian's
``chromium``, driven by Playwright from PyPI through ``executable_path``: no browser download).

Everything runs on loopback behind the real TLS front (``frontstack.py``): Caddy with the role's
Caddyfile and its internal CA, which the browser trusts through its NSS database (not by
ignoring certificate errors). Screenshots of each state go to ``test-artifacts/browser/``
(``SMT_TEST_ARTIFACTS`` overrides the directory).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from frontstack import CADDY, TICKET_SECRET, TOKEN, FrontStack, start_front
from helpers import REPO, sha256

from smt_droplet import coverage_chart
from smt_droplet.tickets import mint
from testbed.browser import CHROMIUM, drop_file, launch, trusting_home, wait_js
from testbed.smt_csv import default_filename, generate_interval_csv

ESIID = "10443720000000055"
APP_ESIID = "10443720000000066"
ARTIFACTS = Path(os.environ.get("SMT_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - scripts/setup installs it
    sync_playwright = None  # type: ignore[assignment]

MISSING = [
    what
    for what, present in (
        ("playwright (pip)", sync_playwright is not None),
        ("chromium (apt)", CHROMIUM.exists()),
        ("caddy (apt)", CADDY is not None),
        ("certutil (apt libnss3-tools)", shutil.which("certutil") is not None),
    )
    if not present
]
if MISSING and os.environ.get("CI"):
    pytest.fail(f"browser tests need {', '.join(MISSING)} (scripts/setup installs them)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}")

APP_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>IntelliWatt admin (stand-in)</title>
<script src="config.js"></script><script src="app.js" defer></script></head>
<body><h1>IntelliWatt admin: upload to the droplet</h1>
<button id="go" type="button">Upload</button><pre id="result">idle</pre></body></html>
"""
APP_JS = """
// What the app's admin page does: fetch + FormData, the ticket its server minted, in a header.
document.getElementById("go").addEventListener("click", async () => {
  const form = new FormData();
  form.append("file", new File([CONFIG.csv], CONFIG.name, { type: "text/csv" }));
  const out = document.getElementById("result");
  try {
    const r = await fetch(CONFIG.droplet + "/upload", {
      method: "POST", headers: { "x-smt-upload-ticket": CONFIG.ticket }, body: form,
    });
    out.textContent = r.status + " " + (await r.text());
  } catch (err) {
    out.textContent = "blocked: " + err;
  }
  out.dataset.done = "1";
});
"""


# Where a files-table row's action buttons end (their right edges), whether the table needs
# sideways scrolling, and whether the row's long reason is folded behind a disclosure.
ROW_LAYOUT = """(sel) => {
  const row = document.querySelector("#files-table " + sel);
  const wrap = document.querySelector(".table-wrap");
  return {
    buttons: [...row.querySelectorAll("td.actions button")]
      .map((b) => b.getBoundingClientRect().right),
    wrapScroll: wrap.scrollWidth,
    wrapWidth: wrap.clientWidth,
    folded: row.querySelector("td.reason details") !== null,
  };
}"""


def signed_in(front: FrontStack, browser: Browser) -> tuple[Any, Page]:
    """A fresh 1280 px browser context signed in to the operator page with the upload token."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(front.url("/"))
    page.fill("#secret", TOKEN)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#app:not([hidden])")
    return context, page


def shot(page: Page, name: str, **kw: Any) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **kw)
    return path


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontStack]:
    root = tmp_path_factory.mktemp("front")
    app, foreign = root / "app-site", root / "foreign-site"
    app.mkdir()
    stack = start_front(root, app, foreign)
    csv = generate_interval_csv(APP_ESIID, date.today() - timedelta(days=20), 7, seed=3)
    ticket = mint(TICKET_SECRET, "customer", "cust-42", int(time.time()) + 3600, 5_000_000)
    config = {"droplet": stack.url("").rstrip("/"), "ticket": ticket, "csv": csv.decode()}
    config["name"] = default_filename(APP_ESIID, date.today() - timedelta(days=20), 7)
    (app / "index.html").write_text(APP_PAGE)
    (app / "app.js").write_text(APP_JS)
    (app / "config.js").write_text(f"const CONFIG = {json.dumps(config)};\n")
    shutil.copytree(app, foreign)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(front: FrontStack) -> Iterator[Browser]:
    home = trusting_home(front.root, front.ca)
    with sync_playwright() as p:
        b = launch(p, home)
        try:
            yield b
        finally:
            b.close()


def test_operator_signs_in_uploads_and_sees_the_file_posted(
    front: FrontStack, browser: Browser
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(front.url("/"))
    assert page.title() == "SMT droplet"
    shot(page, "01-sign-in.png")

    # A wrong token: refused with a clear message, nothing else shown.
    page.fill("#secret", "not-the-token")
    page.press("#secret", "Enter")  # the keyboard is enough
    page.wait_for_selector("#sign-in-error:has-text('Wrong token')")
    assert page.is_hidden("#app")
    shot(page, "02-wrong-token.png")

    page.fill("#secret", TOKEN)
    page.press("#secret", "Enter")
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_selector("#health-verdict:has-text('Healthy')")
    assert TOKEN not in page.content() and TOKEN not in page.url

    # Slow the upload down (2 MB/s) so that the progress bar is seen moving.
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 2e6},
    )
    page.evaluate(
        """() => {
            window.progressSeen = [];
            new MutationObserver((records) => {
                for (const r of records) {
                    if (r.target.tagName === "PROGRESS" && r.attributeName === "value") {
                        window.progressSeen.push([r.target.value, r.target.max]);
                    }
                }
            }).observe(document.getElementById("uploads"), { attributes: true, subtree: true });
        }"""
    )
    start = date.today() - timedelta(days=365)
    csv = generate_interval_csv(ESIID, start, 365, seed=5)  # 12 months to yesterday
    name = default_filename(ESIID, start, 365)
    started = time.monotonic()
    drop_file(page, "#drop-zone", name, csv)
    page.wait_for_selector("li.upload[data-state=sending]")
    wait_js(page, "() => window.progressSeen.some(([v, m]) => v > 0 && v < m)")
    shot(page, "03-uploading.png")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    page.wait_for_selector("li.upload[data-state=posted]", timeout=90_000)
    drop_to_posted = time.monotonic() - started
    print(f"drop to posted: {drop_to_posted:.1f} s for {len(csv)} bytes (upload at 2 MB/s)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "loopback-timing.json").write_text(
        json.dumps({"drop_to_posted_seconds": round(drop_to_posted, 2), "bytes": len(csv)})
    )
    posted = [r for r in front.double.posted() if r["esiid"] == ESIID]
    assert len(posted) == 1 and posted[0]["sha256"] == sha256(csv)
    note = page.text_content("li.upload[data-state=posted] .note") or ""
    assert f"id {posted[0]['id']}" in note and f"ESIID {ESIID}" in note

    # The files table and the coverage chart show it (the page redrew itself, no reload).
    page.wait_for_selector("li.upload[data-shown='1']")
    row = page.locator(f"#files-table tr[data-sha256='{sha256(csv)}']")
    row.wait_for()
    assert row.get_attribute("data-state") == "posted"
    cells = row.locator("td").all_text_contents()
    assert ESIID in cells and "upload" in cells and posted[0]["id"] in cells
    last = start + timedelta(days=364)
    assert f"{start.isoformat()} \N{EN DASH} {last.isoformat()}" in cells
    chart = page.locator(f"#coverage figure[data-esiid='{ESIID}'] img")
    chart.wait_for()
    wait_js(
        page,
        "(sel) => document.querySelector(sel).naturalWidth > 0",
        f"#coverage figure[data-esiid='{ESIID}'] img",
    )
    caption = page.text_content(f"#coverage figure[data-esiid='{ESIID}'] figcaption") or ""
    # today has no data yet: not due, not missing
    assert caption == f"{ESIID}: 89 complete, 0 with gaps, 0 missing (1 not due yet)", caption
    shot(page, "04-posted.png", full_page=True)

    # Refused in the page, before sending: not a CSV, over the cap; the server never sees them.
    before = sorted(os.listdir(front.inbox))
    drop_file(page, "#drop-zone", "notes.txt", b"hello")
    page.wait_for_selector("li.upload[data-state=refused]:has-text('not a CSV')")
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(21 * 1024 * 1024)], "huge.csv"));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }"""
    )
    page.wait_for_selector("li.upload[data-state=refused]:has-text('larger than the cap')")
    assert sorted(os.listdir(front.inbox)) == before

    # The keyboard and the file picker, several files at once.
    picked = []
    for seed in (7, 8):
        esiid = f"104437200000001{seed:02d}"
        first = date.today() - timedelta(days=10)
        path = front.root / default_filename(esiid, first, 3)
        path.write_bytes(generate_interval_csv(esiid, first, 3, seed=seed))
        picked.append(path)
    with page.expect_file_chooser() as chooser:
        page.focus("#drop-zone")
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files([str(p) for p in picked])
    for path in picked:
        page.wait_for_selector(f"li.upload[data-state=posted]:has-text('{path.name}')")
    assert {sha256(p) for p in picked} <= {r["sha256"] for r in front.double.posted()}

    # Readable at 360 px: nothing wider than the screen but the table's own scroll box.
    page.set_viewport_size({"width": 360, "height": 800})
    wide = page.evaluate(
        """() => [...document.querySelectorAll("body *")]
            .filter((e) => !e.closest(".table-wrap") && e.getBoundingClientRect().right > 360)
            .map((e) => e.tagName + "#" + e.id + "." + e.className)"""
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, wide
    # The chart keeps its month labels readable: it scrolls in its own box rather than
    # squeezing 90 days into 360 px (where they were under 6 px high).
    box = page.locator("#coverage figure img").first.bounding_box()
    assert box is not None
    label_px = box["width"] * coverage_chart.FONT / (coverage_chart.DAYS * coverage_chart.CELL)
    assert label_px >= 9, f"month labels {label_px:.1f} px high at 360 px"
    shot(page, "05-narrow.png", full_page=True)

    for log in ("upload-server.log", "caddy.log", "ingest.log"):
        assert TOKEN not in (front.root / log).read_text(errors="replace"), log
    assert not [e for e in errors if "401" not in e], errors
    context.close()


def test_operator_settles_files_that_need_a_person(front: FrontStack, browser: Browser) -> None:
    orphan, junk = front.inbox / "adhocusage/orphan.csv", front.inbox / "adhocusage/junk.csv"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    junk.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/9/2025,2.0\n")
    # An SFTP delivery: the timer's pass finds them (here: a request, as the timer would run it).
    from smt_droplet import spool

    spool.enqueue(front.spool, "cli", reason="test: timer pass")
    context, page = signed_in(front, browser)
    orphan_row = page.locator(f"#files-table tr[data-sha256='{sha256(orphan)}']")

    def orphan_state() -> str | None:
        return orphan_row.get_attribute("data-state") if orphan_row.count() else None

    # The inbox lists the file as "pending" before the pass has looked at it: refresh until the
    # pass has (or the deadline).
    deadline = time.monotonic() + 30
    while orphan_state() != "no-esiid" and time.monotonic() < deadline:
        page.click("#filter button[type=submit]")
        page.wait_for_timeout(500)
    assert orphan_state() == "no-esiid"
    # Files wait for a person: the health box says so, in amber, not a green "Healthy" (the
    # pass writes its record after the ledger: refresh until it has finished).
    verdict = page.locator("#health-verdict.warn:has-text('2 file(s) wait for a person')")
    deadline = time.monotonic() + 30
    while verdict.count() == 0 and time.monotonic() < deadline:
        page.click("#filter button[type=submit]")
        page.wait_for_timeout(500)
    assert verdict.count() == 1, page.text_content("#health-verdict")
    # The long reason (it spells out commands) is folded, the buttons stay on screen, the
    # name breaks at its separators; at 1280 px and at 360 px (rows as cards).
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(200)
        layout = page.evaluate(ROW_LAYOUT, f"tr[data-sha256='{sha256(orphan)}']")
        assert layout["buttons"] and all(r <= width for r in layout["buttons"]), layout
        assert layout["wrapScroll"] <= layout["wrapWidth"] + 1, layout  # no sideways scroll
        assert layout["folded"], layout
        shot(page, f"06-waiting-row-{width}.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})

    page.select_option("#filter-outcome", "no-esiid")
    page.click("#filter button[type=submit]")
    page.wait_for_selector("#files-count:has-text('2 file(s)')")
    orphan_row.locator("button[data-action=post]").click()
    page.wait_for_selector("#confirm[open]")
    page.fill("#confirm-input", "123")
    page.click("#confirm-ok")
    page.wait_for_selector("#confirm-error:has-text('17 digits')")  # refused, dialog stays
    page.fill("#confirm-input", ESIID)
    shot(page, "06-confirm-post.png")
    page.click("#confirm-ok")
    page.wait_for_selector("#action-status:has-text('post: done by the pass')", timeout=60_000)

    junk_row = page.locator(f"#files-table tr[data-sha256='{sha256(junk)}']")
    junk_row.locator("button[data-action=ignore]").click()
    page.fill("#confirm-input", "a test export")
    page.keyboard.press("Enter")
    page.wait_for_selector("#action-status:has-text('ignore: done by the pass')", timeout=60_000)
    page.select_option("#filter-outcome", "")
    page.click("#filter button[type=submit]")
    page.wait_for_selector(f"#files-table tr[data-sha256='{sha256(junk)}'][data-state=ignored]")
    page.wait_for_selector(f"#files-table tr[data-sha256='{sha256(orphan)}'][data-state=posted]")
    assert [r["esiid"] for r in front.double.posted() if r["sha256"] == sha256(orphan)] == [ESIID]
    assert not [r for r in front.double.received() if r["sha256"] == sha256(junk)]
    shot(page, "07-settled.png", full_page=True)
    context.close()


def test_operator_sees_what_the_app_stored_and_sends_a_short_file_again(
    front: FrontStack, browser: Browser
) -> None:
    from smt_droplet import spool

    esiid, first = "10443720000000077", date(2026, 6, 10)
    path = front.inbox / default_filename(esiid, first, 3)
    path.write_bytes(generate_interval_csv(esiid, first, 3, seed=11))
    front.double.configure(drop_intervals=4)  # the app's parser loses 4 of this file's 288
    spool.enqueue(front.spool, "cli", reason="test: timer pass")
    context, page = signed_in(front, browser)
    page.select_option("#filter-landing", "short,none,mismatch")
    row = page.locator(f"#files-table tr[data-sha256='{sha256(path)}']")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the pass may still run
        page.click("#filter button[type=submit]")
        page.wait_for_timeout(500)
        if row.locator("td.landing[data-verdict=short]").count():
            break
    cell = row.locator("td.landing")
    assert cell.get_attribute("data-verdict") == "short"
    assert cell.text_content() == "app 284 / file 288"
    assert "landing-short" in (cell.get_attribute("class") or "")
    assert "the app stored 284 of 288 intervals; missing" in (row.text_content() or "")
    # only files the app did not store whole are listed (here also the orphan of the test
    # above: a layout the app's parser does not read, so it stored nothing of it)
    verdicts = page.locator("#files-table td.landing").evaluate_all(
        "(cells) => cells.map((c) => c.dataset.verdict)"
    )
    assert verdicts and set(verdicts) <= {"short", "none", "mismatch"}, verdicts
    shot(page, "08-landed-short.png", full_page=True)
    row.locator("button[data-action=resend]").click()
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-ok")
    page.wait_for_selector("#action-status:has-text('resend: done by the pass')", timeout=60_000)
    page.click("#filter button[type=submit]")
    row.wait_for(state="detached")  # no longer among the files that did not land whole
    page.select_option("#filter-landing", "exact")
    page.click("#filter button[type=submit]")
    exact = page.locator(f"#files-table tr[data-sha256='{sha256(path)}'] td.landing")
    exact.wait_for()
    assert exact.text_content() == "app 288 / file 288"
    assert exact.get_attribute("data-verdict") == "exact"
    shot(page, "09-sent-again.png")
    context.close()


def _app_upload(browser: Browser, origin: str) -> str:
    page = browser.new_page()
    page.goto(origin + "/")
    page.click("#go")
    page.wait_for_selector("#result[data-done='1']", timeout=30_000)
    text = page.text_content("#result") or ""
    page.close()
    return text


def test_the_apps_origin_uploads_cross_origin_and_another_is_blocked(
    front: FrontStack, browser: Browser
) -> None:
    log = front.root / "upload-server.log"
    queued_before = len(list(front.spool.glob("*/*.json")))
    inbox_before = sorted(p.name for p in front.inbox.iterdir())

    blocked = _app_upload(browser, front.foreign_origin)
    assert blocked.startswith("blocked: TypeError"), blocked
    assert "OPTIONS /upload 403" in log.read_text()  # refused at the preflight
    assert "POST /upload" not in log.read_text().split("OPTIONS /upload 403")[-1]
    assert sorted(p.name for p in front.inbox.iterdir()) == inbox_before
    assert len(list(front.spool.glob("*/*.json"))) == queued_before

    answer = _app_upload(browser, front.app_origin)
    status, _, body = answer.partition(" ")
    assert status == "202", answer
    reply = json.loads(body)
    assert reply["stored"] and reply["queued"] and reply["role"] == "customer"
    assert "OPTIONS /upload 204" in log.read_text()  # the browser asked first
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if [r for r in front.double.posted() if r["esiid"] == APP_ESIID]:
            break
        time.sleep(0.5)
    posted = [r for r in front.double.posted() if r["esiid"] == APP_ESIID]
    assert len(posted) == 1 and posted[0]["sha256"] == reply["sha256"]
