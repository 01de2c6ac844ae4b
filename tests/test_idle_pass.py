"""An idle ingest pass (nothing new to post) never imports ``requests`` (about 0.08 s)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import cli_env

from testbed.intelliwatt_double import IntelliWattDouble

IMPORTED_REQUESTS = re.compile(r"\|\s+requests$", re.MULTILINE)


def ingest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "smt_droplet", "ingest"],
        env=cli_env(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_idle_pass_does_not_import_requests_and_a_post_does(
    ingest_env: dict[str, str], inbox: Path, webapp: IntelliWattDouble, smt_csv
) -> None:
    idle = ingest(ingest_env)
    assert idle.returncode == 0, idle.stderr
    assert "exit=0" in idle.stderr
    assert not IMPORTED_REQUESTS.search(idle.stderr)

    smt_csv.write(inbox)
    posting = ingest(ingest_env)
    assert posting.returncode == 0, posting.stderr
    assert "posted=1" in posting.stderr
    assert IMPORTED_REQUESTS.search(posting.stderr)  # the check above can see the import
    assert len(webapp.requests()) == 1
