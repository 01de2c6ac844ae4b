"""Delivery that lands: the app's large-file path (raw-upload), refusals classified by what they
mean, landing verdicts from the app's own count, and sending again on purpose — against the
double in each of the app's eras, through the real CLI."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from datetime import date
from pathlib import Path

import pytest
from helpers import AlertReceiver, cli, sha256, start_cli

from smt_droplet import spool
from smt_droplet.csvdata import summarize
from smt_droplet.ledger import read_post_records, read_posted_digests
from smt_droplet.raw_upload import split_parts
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.smt_csv import generate_interval_csv

ESIID = "10443720000000099"
OTHER = "10443720000000011"
FALL_BACK_2026 = date(2026, 10, 31)  # three days: 10/31, 11/1 (100 rows), 11/2


@pytest.fixture
def env(webapp: IntelliWattDouble, inbox: Path, tmp_path: Path) -> dict[str, str]:
    assert webapp.admin_token is not None
    spool_dir = tmp_path / "spool"
    spool.ensure_layout(spool_dir)
    (tmp_path / "metrics").mkdir()
    return {
        "ADMIN_TOKEN": webapp.admin_token,
        "INTELLIWATT_BASE_URL": webapp.url,
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SPOOL_DIR": str(spool_dir),
        "SMT_METRICS_DIR": str(tmp_path / "metrics"),
        "SMT_HTTP_TIMEOUT": "5",
        "SMT_RETRY_BASE_DELAY": "0.01",
        "SMT_RETRY_MAX_DELAY": "0.05",
        "SMT_LOCK_WAIT": "30",
        "SMT_DELIVERY": "raw-upload",
    }


def put(inbox: Path, esiid: str, start: date, days: int, seed: int = 0) -> Path:
    path = inbox / f"IntervalMeterUsage_{esiid}_{start:%Y%m%d}_{days}d_{seed}.csv"
    path.write_bytes(generate_interval_csv(esiid, start, days, seed))
    return path


def ingest(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(["ingest", "--no-sync", *extra], env, timeout=300)


def status(env: dict[str, str], *extra: str) -> dict:
    proc = cli(["status", "--json", *extra], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def row_of(report: dict, path: Path) -> dict:
    return next(r for r in report["files"] if r["path"] == path.name)


def metrics(env: dict[str, str]) -> str:
    return (Path(env["SMT_METRICS_DIR"]) / "smt_ingest.prom").read_text()


# -- parts ---------------------------------------------------------------------------------


def test_parts_are_whole_lines_with_the_header_and_fit_the_cap() -> None:
    data = generate_interval_csv(ESIID, date(2026, 3, 1), 20)
    fields = {"contentType": "text/csv", "esiid": ESIID, "meter": "M1", "source": "adhocusage"}
    for cap in (20_000, 50_000, 120_000):
        parts = split_parts(data, "f.csv", cap=cap, fields=fields)
        assert len(parts) > 1
        header = data.split(b"\n", 1)[0] + b"\n"
        assert all(len(p.body) == p.size <= cap for p in parts)
        assert all(p.data.startswith(header) and p.data.endswith(b"\n") for p in parts)
        assert parts[0].data + b"".join(p.data[len(header) :] for p in parts[1:]) == data
        bodies = [json.loads(p.body) for p in parts]
        assert [b["postIngest"] for b in bodies] == [False] * (len(parts) - 1) + [True]
        assert [b["filename"] for b in bodies][-1] == f"f.csv.part{len(parts)}-of-{len(parts)}"
        assert all(b["sha256"] == sha256(p.data) for b, p in zip(bodies, parts, strict=True))
        # the budget comes from the cap: the fullest part uses most of it
        assert max(len(p.body) for p in parts) > cap * 0.9
    one = split_parts(data, "f.csv", cap=10_000_000, fields=fields)
    assert len(one) == 1 and one[0].filename == "f.csv" and one[0].data == data


def test_a_twelve_month_file_lands_whole_in_parts_under_the_cap(env, webapp, inbox) -> None:
    path = put(inbox, ESIID, date(2025, 1, 1), 365)
    assert summarize(path.read_bytes()).intervals_present == 35040
    cap = 1_000_000
    proc = ingest({**env, "SMT_MAX_BODY_BYTES": str(cap)})
    assert proc.returncode == 0, proc.stderr
    requests = webapp.requests()
    assert len(requests) >= 3 and all(r["body_bytes"] <= cap for r in requests)
    assert {r["path"] for r in requests} == {"/api/admin/smt/raw-upload"}
    assert all(r["sha256_matches"] and r["size_matches"] for r in webapp.received())
    whole = webapp.assembled()[path.name]
    assert whole["content"] == path.read_bytes() and whole["copies"] == 1
    assert "landed=exact app=35040/file=35040" in proc.stderr
    row = row_of(status(env), path)
    assert row["landing"]["verdict"] == "exact"
    assert (row["landing"]["app"]["intervals"], row["landing"]["file"]["intervals"]) == (
        35040,
        35040,
    )
    assert read_posted_digests(inbox / ".posted_sha256") == {sha256(path)}
    text = status_env_text(env)
    assert "landed=exact app=35040/file=35040" in text


def status_env_text(env: dict[str, str]) -> str:
    proc = cli(["status"], env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_sigkill_between_parts_then_a_pass_posts_the_file_once(env, webapp, inbox) -> None:
    path = put(inbox, ESIID, date(2026, 6, 1), 30)
    run_env = {**env, "SMT_MAX_BODY_BYTES": "40000"}
    webapp.stall_next(3, 0.0)
    webapp.stall_next(1, 2.0)  # part 4 hangs: the pass is killed while it waits
    proc = start_cli(["ingest", "--no-sync"], run_env)
    deadline = time.monotonic() + 30
    while webapp._stalls and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert len(webapp.received()) == 3  # parts 1-3 accepted, part 4 in flight
    assert read_posted_digests(inbox / ".posted_sha256") == set()  # a file, never parts
    time.sleep(2.2)  # the stalled part completes at the app, as a slow server would
    done = ingest(run_env)
    assert done.returncode == 0, done.stderr
    whole = webapp.assembled()[path.name]
    assert whole["content"] == path.read_bytes() and whole["copies"] == 1
    assert read_posted_digests(inbox / ".posted_sha256") == {sha256(path)}
    assert (inbox / ".posted_sha256").read_text().count("\n") == 1
    records = read_post_records(inbox / ".posted_sha256")
    assert records[sha256(path)]["landing"]["verdict"] == "exact"
    stored = webapp.app.stored(ESIID)
    assert len(stored) == summarize(path.read_bytes()).intervals_present


# -- refusals ----------------------------------------------------------------------------------


def test_production_app_stops_an_inline_pass_at_once_and_raw_upload_posts_all(
    env, webapp, inbox, tmp_path
) -> None:
    webapp.configure(era="production", known_esiids=[ESIID])
    files = [put(inbox, ESIID, date(2026, 11, 20), 1, seed=i) for i in range(3)]
    receiver = AlertReceiver()
    try:
        inline = {**env, "SMT_DELIVERY": "inline"}
        proc = ingest(inline)
        assert proc.returncode == 2, proc.stderr
        assert len(webapp.requests()) == 1  # the first file stops the pass
        assert proc.stderr.count("smt_ingest_delivery: raw-upload") == 1
        assert "INLINE_DISABLED" in proc.stderr
        report = status(env)
        assert "rejected" not in report["counts"] and report["needs_operator"] == 0
        last = json.loads((Path(env["SMT_SPOOL_DIR"]) / "status/last-ingest.json").read_text())
        assert last["exit_code"] == 2 and "smt_ingest_delivery" in last["fatal"]
        notify_env = {
            "SMT_SPOOL_DIR": env["SMT_SPOOL_DIR"],
            "SMT_NOTIFY_URL": receiver.url,
            "SMT_NOTIFY_STATE": str(tmp_path / "sent.json"),
        }
        sent = cli(["notify", "failure", "smt-ingest.service"], notify_env)
        assert sent.returncode == 0, sent.stderr
        assert "smt_ingest_delivery: raw-upload" in receiver.bodies[0]["message"]
    finally:
        receiver.stop()
    proc = ingest(env)  # SMT_DELIVERY=raw-upload
    assert proc.returncode == 0, proc.stderr
    assert read_posted_digests(inbox / ".posted_sha256") == {sha256(p) for p in files}
    assert status(env)["counts"] == {"posted": 3}


def test_an_esiid_the_app_does_not_know_waits_and_heals_without_an_operator(
    env, webapp, inbox
) -> None:
    webapp.configure(era="2026-dev", known_esiids=[ESIID])
    known = put(inbox, ESIID, date(2026, 11, 20), 1)
    unknown = put(inbox, OTHER, date(2026, 11, 20), 1)
    inline = {**env, "SMT_DELIVERY": "inline", "SMT_WAITING_RETRY_SECONDS": "3600"}
    proc = ingest(inline)
    assert proc.returncode == 0, proc.stderr
    assert f"the app does not know ESIID {OTHER} yet" in proc.stderr
    assert "add the customer's address in the app" in proc.stderr
    report = status(env)
    row = row_of(report, unknown)
    assert row["state"] == "waiting-for-app" and not row["needs_operator"]
    assert report["waiting_for_app"] == 1 and row_of(report, known)["state"] == "posted"
    assert "smt_ingest_files_waiting_for_app 1.0" in metrics(env)
    last = json.loads((Path(env["SMT_SPOOL_DIR"]) / "status/last-ingest.json").read_text())
    assert last["waiting_for_app"] == 1 and last["counts"]["waiting-for-app"] == 1
    before = len(webapp.requests())
    again = ingest(inline)  # not due yet: no request
    assert again.returncode == 0 and len(webapp.requests()) == before
    assert "skipped-waiting=1" in again.stderr
    webapp.configure(known_esiids=[ESIID, OTHER])  # the customer's address was added
    healed = ingest({**inline, "SMT_WAITING_RETRY_SECONDS": "0"})
    assert healed.returncode == 0, healed.stderr
    assert row_of(status(env), unknown)["state"] == "posted"
    assert "smt_ingest_files_waiting_for_app 0.0" in metrics(env)


# -- landing verdicts ----------------------------------------------------------------------


def test_short_and_empty_landings_are_said_everywhere(env, webapp, inbox) -> None:
    webapp.configure(dst_overwrite=True, window_days=365)
    dst = put(inbox, ESIID, FALL_BACK_2026, 3)
    old = put(inbox, OTHER, date(2024, 6, 1), 2)
    proc = ingest(env)
    assert proc.returncode == 0, proc.stderr
    assert "landed=short app=288/file=292" in proc.stderr
    assert "missing 2026-11-01 07:00-07:45Z (the repeated hour of 2026-11-01)" in proc.stderr
    assert "landed=none app=0/file=192" in proc.stderr
    report = status(env)
    assert row_of(report, dst)["landing"]["verdict"] == "short"
    assert row_of(report, old)["landing"]["verdict"] == "none"
    assert report["landing"] == {"short": 1, "none": 1}
    only = status(env, "--landing", "short")
    assert [r["path"] for r in only["files"]] == [dst.name]
    prom = metrics(env)
    assert 'smt_ingest_last_pass_files_landed{verdict="short"} 1.0' in prom
    assert 'smt_ingest_last_pass_files_landed{verdict="none"} 1.0' in prom
    assert "smt_ingest_last_pass_intervals_landed 288.0" in prom
    assert "smt_ingest_last_pass_intervals_posted 484.0" in prom


def test_inline_landing_is_unverified_not_the_files_own_figures(env, webapp, inbox) -> None:
    path = put(inbox, ESIID, date(2026, 11, 20), 1)
    proc = ingest({**env, "SMT_DELIVERY": "inline"})
    assert proc.returncode == 0, proc.stderr
    assert "landed=unverified app=-/file=96" in proc.stderr
    landing = row_of(status(env), path)["landing"]
    assert landing["verdict"] == "unverified" and landing["app"] is None
    assert 'smt_ingest_last_pass_files_landed{verdict="unverified"} 1.0' in metrics(env)


def test_resend_by_verdict_lists_then_queues_and_the_verdict_is_updated(env, webapp, inbox) -> None:
    webapp.configure(drop_intervals=4)
    short = put(inbox, OTHER, date(2026, 11, 20), 2)  # the pass's first file: it loses 4
    fine = put(inbox, ESIID, date(2026, 11, 20), 2)
    proc = ingest(env)
    assert proc.returncode == 0, proc.stderr
    assert row_of(status(env), short)["landing"]["verdict"] == "short"
    assert row_of(status(env), fine)["landing"]["verdict"] == "exact"
    listed = cli(["resend", "--landing", "short,none", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    chosen = json.loads(listed.stdout)
    assert [f["path"] for f in chosen["files"]] == [short.name] and chosen["queued"] == 0
    assert spool.depth(Path(env["SMT_SPOOL_DIR"])) == 0  # nothing sent without --yes
    text = cli(["resend", "--landing", "short"], env).stdout
    assert "nothing sent: add --yes" in text
    before = len(webapp.requests())
    assert cli(["resend", "--landing", "short", "--yes"], env).returncode == 0
    again = ingest(env)
    assert again.returncode == 0, again.stderr
    assert len(webapp.requests()) == before + 1  # only the short file went again
    assert row_of(status(env), short)["landing"]["verdict"] == "exact"
    assert (inbox / ".posted_sha256").read_text().count("\n") == 2  # still one line a file
    nothing = cli(["resend", "--landing", "short,none", "--json"], env)
    assert json.loads(nothing.stdout)["files"] == []
    assert cli(["resend"], env).returncode == 2  # a selection is required


# -- faults --------------------------------------------------------------------------------


def test_fault_loop_over_raw_upload_loses_nothing_and_counts_no_half_file(
    env, webapp, inbox
) -> None:
    """500s, answers lost to a client timeout, and kills at random instants, over files in
    several parts; then one clean pass."""
    run_env = {
        **env,
        "SMT_MAX_BODY_BYTES": "12000",
        "SMT_HTTP_TIMEOUT": "1",
        "SMT_POST_RETRIES": "1",
    }
    files = [
        put(inbox, ESIID if i % 2 else OTHER, date(2026, 9, 1 + i), 3, seed=i) for i in range(6)
    ]
    expected = {p.name: p.read_bytes() for p in files}
    rng = random.Random(20261207)
    for round_ in range(6):
        webapp.fail_next(rng.randrange(1, 4), 500)
        webapp.stall_next(rng.randrange(0, 3), 0.0)
        webapp.stall_next(1, 1.5)  # the client gives up; the app still stores the part
        proc = start_cli(["ingest", "--no-sync"], run_env)
        if round_ % 2:
            time.sleep(rng.uniform(0.2, 1.2))
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        assembled = webapp.assembled()
        for digest in read_posted_digests(inbox / ".posted_sha256"):
            name = next(n for n, data in expected.items() if sha256(data) == digest)
            assert assembled[name]["content"] == expected[name]  # posted ⇒ every part landed
    time.sleep(1.6)
    with webapp._lock:
        webapp._failures.clear()
        webapp._stalls.clear()
    final = ingest(run_env)
    assert final.returncode == 0, final.stderr
    assembled = webapp.assembled()
    for name, data in expected.items():
        assert assembled[name]["content"] == data and assembled[name]["copies"] == 1
    assert read_posted_digests(inbox / ".posted_sha256") == {sha256(d) for d in expected.values()}
    assert (inbox / ".posted_sha256").read_text().count("\n") == len(expected)
    report = status(env)
    assert report["counts"] == {"posted": len(expected)}
    assert report["landing"] == {"exact": len(expected)}
