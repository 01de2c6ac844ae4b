"""Files that need a person: reported once, never failing later passes, settled by the
operator with ``post --esiid``, ``ignore`` or ``forget`` — each of which accepts what
``status`` prints (inbox-relative names, unique digest prefixes)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import cli, fast_env, sha256

from smt_droplet.ingest import run_pass
from smt_droplet.ledger import Ledger

ESIID = "10443720000000011"
OTHER = "10443720000000022"
OLD = time.time() - 3600


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    return fast_env(ingest_env, post_retries=2)


def status(env: dict[str, str]) -> dict[str, dict]:
    proc = cli(["status", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return {row["path"]: row for row in json.loads(proc.stdout)["files"]}


def test_no_esiid_file_is_settled_by_ignore(env, inbox, smt_csv, webapp) -> None:
    sub = inbox / "adhocusage"
    sub.mkdir()
    orphan = sub / "orphan.csv"
    orphan.write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    smt_csv.write(inbox, name=f"IntervalMeterUsage_{ESIID}_20250309.csv", esiid=ESIID)
    first = run_pass(env, sync=False)
    assert first.exit_code == 0 and first.counts() == {"posted": 1, "no-esiid": 1}
    rows = status(env)
    row = rows["adhocusage/orphan.csv"]
    assert row["state"] == "no-esiid" and row["needs_operator"] is True
    assert "smt-droplet post adhocusage/orphan.csv --esiid" in row["reason"]
    assert row["arrived"] and row["at"] and row["summary"]["layout"] == "unknown"
    posted = rows[f"IntervalMeterUsage_{ESIID}_20250309.csv"]
    assert (posted["esiid"], posted["meter"], posted["app_id"]) == (ESIID, "M1", "1")
    assert posted["summary"]["intervals_present"] == 96 and posted["needs_operator"] is False
    human = cli(["status"], env).stdout.splitlines()
    assert human[0].startswith("no-esiid") and "reason:" in human[0]  # the person's work first
    assert "needs-operator=1" in human[-1]

    proc = cli(["ignore", "adhocusage/orphan.csv", "--reason", "test  export\nfrom QA"], env)
    assert proc.returncode == 0, proc.stderr
    assert "ignored adhocusage/orphan.csv" in proc.stderr
    row = status(env)["adhocusage/orphan.csv"]
    assert (row["state"], row["reason"], row["needs_operator"]) == (
        "ignored",
        "test export from QA",
        False,
    )
    second = run_pass({**env, "ESIID_DEFAULT": OTHER}, sync=False)  # even a default: no post
    assert second.counts() == {"skipped-already-posted": 1, "ignored": 1}
    assert len(webapp.requests()) == 1
    # Gone from the inbox and delivered again (SFTP re-download): the tombstone still holds.
    data = orphan.read_bytes()
    orphan.unlink()
    again = inbox / "orphan-again.csv"
    again.write_bytes(data)
    third = run_pass({**env, "ESIID_DEFAULT": OTHER}, sync=False)
    assert {f.path: str(f.outcome) for f in third.files}["orphan-again.csv"] == "ignored"
    assert len(webapp.requests()) == 1
    # `forget` by a digest prefix lifts it; the next pass with a default posts it.
    prefix = sha256(again)[:10]
    assert cli(["forget", prefix], env).returncode == 0
    fourth = run_pass({**env, "ESIID_DEFAULT": OTHER}, sync=False)
    assert fourth.counts()["posted"] == 1 and webapp.received()[-1]["esiid"] == OTHER


def test_post_with_an_esiid_by_digest_prefix(env, inbox, webapp) -> None:
    (inbox / "orphan.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    assert run_pass(env, sync=False).counts() == {"no-esiid": 1}
    prefix = status(env)["orphan.csv"]["sha256"][:12]
    proc = cli(["post", prefix, "--esiid", OTHER], env)
    assert proc.returncode == 0, proc.stderr
    assert webapp.received()[-1]["esiid"] == OTHER
    row = status(env)["orphan.csv"]
    assert row["state"] == "posted" and row["esiid"] == OTHER


def test_targets_that_do_not_resolve_are_clear_errors(env, inbox, smt_csv) -> None:
    smt_csv.write(inbox, name=f"a_{ESIID}.csv", esiid=ESIID, seed=1)
    smt_csv.write(inbox, name=f"b_{ESIID}.csv", esiid=ESIID, seed=2)
    run_pass(env, sync=False)
    digests = [r["sha256"] for r in status(env).values()]
    proc = cli(["ignore", "nosuch.csv", "--reason", "x"], env)
    assert proc.returncode == 2 and "neither a file" in proc.stderr
    short = cli(["forget", digests[0][:4]], env)  # too short to be a prefix
    assert short.returncode == 2
    proc = cli(["ignore", f"a_{ESIID}.csv", "--reason", "late"], env)
    assert proc.returncode == 2 and "already posted" in proc.stderr
    assert cli(["ignore", digests[0][:8], "--reason", " "], env).returncode == 2


def test_ambiguous_prefix_is_refused(env, inbox) -> None:
    ledger = Ledger.load(inbox / ".posted_sha256")
    ledger.record_outcome("ab" * 32, "no-esiid", "r", "x.csv")
    ledger.record_outcome("ababab" + "0" * 58, "no-esiid", "r", "y.csv")
    ledger.save()
    proc = cli(["ignore", "ababab", "--reason", "x"], env)
    assert proc.returncode == 2 and "ambiguous: 2 digests" in proc.stderr


def test_not_a_csv_needs_a_person_and_is_not_posted(env, inbox, webapp, caplog) -> None:
    page = inbox / f"IntervalMeterUsage_{ESIID}_error.csv"
    page.write_bytes(b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n")
    (inbox / "empty.csv").write_bytes(b"")
    first = run_pass(env, sync=False)
    assert first.exit_code == 0 and first.counts() == {"not-csv": 2}
    assert webapp.requests() == []
    second = run_pass(env, sync=False)
    assert second.counts() == {"skipped-not-csv": 2} and second.exit_code == 0
    assert all(f.reported_before for f in second.files)
    rows = status(env)
    assert rows[page.name]["state"] == "not-csv" and "HTML" in rows[page.name]["reason"]
    assert rows["empty.csv"]["needs_operator"] is True


def test_a_waiting_no_esiid_file_does_not_rewrite_the_ledger(env, inbox, smt_csv) -> None:
    """An idle pass over an inbox with an orphan must not rewrite the sidecar every 30 min
    (it holds the hash cache of every file: years of deliveries)."""
    (inbox / "orphan.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    smt_csv.write(inbox, name=f"a_{ESIID}.csv", esiid=ESIID)
    run_pass(env, sync=False)
    sidecar = inbox / ".posted_sha256.json"
    before = sidecar.stat()
    second = run_pass(env, sync=False)
    assert second.counts() == {"skipped-already-posted": 1, "no-esiid": 1}
    after = sidecar.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
