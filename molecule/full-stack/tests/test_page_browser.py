"""The operator page on the converged droplet, in headless Chromium on this machine.

The browser trusts the droplet's exported internal CA (``/etc/smt-droplet/tls-ca.crt``) and
reaches the TLS front on 443 through a byte-for-byte TCP forward on loopback, so it calls the
droplet by the name its certificate carries (``localhost`` in the test bed). The file it drops
goes through Caddy to the upload server, the spool, ``smt-ingest.path`` and a real pass to the
IntelliWatt double inside the container.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import REPO, Bed, wait_for

sys.path.insert(0, str(REPO))
from testbed.browser import CHROMIUM, Forward, drop_file, launch, trusting_home
from testbed.smt_csv import default_filename, generate_interval_csv

ARTIFACTS = Path(os.environ.get("SMT_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"


def test_13_operator_page_drop_to_posted_in_a_real_browser(bed: Bed, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    assert CHROMIUM.exists(), "scripts/setup installs Debian's chromium"
    ca = tmp_path / "droplet-ca.crt"
    ca.write_text(bed.run("cat /etc/smt-droplet/tls-ca.crt").stdout)
    address = bed.run("hostname -I").stdout.split()[0]
    forward = Forward((address, 443))
    home = trusting_home(tmp_path, ca)
    esiid = "1044372" + "".join(secrets.choice("0123456789") for _ in range(10))
    start = date.today() - timedelta(days=365)
    csv = generate_interval_csv(esiid, start, 365, seed=11)
    name = default_filename(esiid, start, 365)
    try:
        with playwright.sync_playwright() as p:
            browser = launch(p, home)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"https://localhost:{forward.port}/")
            page.fill("#secret", bed.vars["smt_testbed_upload_token"])
            page.press("#secret", "Enter")
            page.wait_for_selector("#app:not([hidden])")
            # On systemd the page knows when the timer runs next.
            next_run = page.locator("#health-facts dt:has-text('Next timer run') + dd")
            next_run.wait_for()
            assert next_run.text_content() != "\N{EN DASH}", "no next timer run shown"
            started = time.monotonic()
            drop_file(page, "#drop-zone", name, csv)
            page.wait_for_selector("li.upload[data-state=posted]", timeout=120_000)
            seconds = time.monotonic() - started
            print(f"full-stack: drop to posted {seconds:.1f} s for {len(csv)} bytes")
            page.wait_for_selector("li.upload[data-shown='1']")
            caption = page.text_content(f"#coverage figure[data-esiid='{esiid}'] figcaption")
            # today has no data yet: "not due", not missing
            expected = f"{esiid}: 89 complete, 0 with gaps, 0 missing (1 not due yet)"
            assert caption == expected, caption
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "full-stack-timing.json").write_text(
                json.dumps({"drop_to_posted_seconds": round(seconds, 2), "bytes": len(csv)})
            )
            page.screenshot(path=str(ARTIFACTS / "full-stack-posted.png"), full_page=True)
            browser.close()
    finally:
        forward.close()
    digest = hashlib.sha256(csv).hexdigest()
    posted = wait_for(lambda: bed.posts_of(digest), 30, "the post at the double")
    assert [p["esiid"] for p in posted] == [esiid]
