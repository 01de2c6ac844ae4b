"""One record of every pass: the last-result file, the metrics textfile, and the journal lines
of a module-run pass (sent over the syslog socket journald reads, under ``smt-ingest``)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from helpers import VENV_BIN, cli, fast_env, run_playbook, task_results
from prometheus_client.parser import text_string_to_metric_families

from smt_droplet import spool
from smt_droplet.ingest import run_pass
from smt_droplet.passrecord import verdict

ESIID = "10443720000000011"
OLD = time.time() - 3600


@pytest.fixture
def env(ingest_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    spool.ensure_layout(Path(ingest_env["SMT_SPOOL_DIR"]))
    return fast_env(ingest_env, post_retries=1, SMT_METRICS_DIR=str(metrics))


def metrics(env: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (Path(env["SMT_METRICS_DIR"]) / "smt_ingest.prom").read_text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_pass_writes_its_record_and_metrics(env, sftp_peer, smt_csv, webapp) -> None:
    path = smt_csv.write(sftp_peer.root, name=f"IntervalMeterUsage_{ESIID}_1.csv", days=2)
    os.utime(path, (OLD, OLD))
    (sftp_peer.root / "orphan.csv").write_bytes(b"A,B\n1,2\n")
    os.utime(sftp_peer.root / "orphan.csv", (OLD, OLD))
    before = time.time()
    result = run_pass(env)
    assert result.exit_code == 0
    record = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert record is not None and record["trigger"] == "command"
    assert record["exit_code"] == 0 and record["last_success_ts"] >= before
    assert record["needs_operator"] == 1 and record["bytes_posted"] == path.stat().st_size
    assert record["bytes_downloaded"] == path.stat().st_size + 8
    mine = {f["path"]: f for f in record["files"]}
    assert mine[path.name]["app_id"] == "1" and mine[path.name]["esiid"] == ESIID
    assert mine["orphan.csv"]["needs_operator"] is True
    m = metrics(env)
    assert m[("smt_ingest_last_pass_exit_code", ())] == 0
    assert m[("smt_ingest_last_success_timestamp_seconds", ())] == record["last_success_ts"]
    assert m[("smt_ingest_files_needing_operator", ())] == 1
    assert m[("smt_ingest_last_pass_files", (("outcome", "posted"),))] == 1
    assert m[("smt_ingest_last_pass_files", (("outcome", "no-esiid"),))] == 1
    assert m[("smt_ingest_inbox_files", ())] == 2
    assert m[("smt_ingest_last_pass_downloaded_bytes", ())] == record["bytes_downloaded"]
    assert m[("smt_ingest_free_bytes", ())] > 0
    assert (
        m[("smt_ingest_last_pass_intervals_posted", ())] == record["intervals_posted"] == 96 + 92
    )  # 3/8, 3/9 (DST)
    assert m[("smt_ingest_last_pass_intervals_missing", ())] == 0
    assert m[("smt_ingest_last_pass_files_with_gaps", ())] == 0
    assert verdict(record, 3600) == ""

    # The SFTP peer goes away: the pass fails, the last success is carried over.
    sftp_peer.stop()
    failed = run_pass(fast_env(env, sftp_retries=1))
    assert failed.exit_code == 1
    again = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert again is not None and again["exit_code"] == 1 and again["sync_error"]
    assert again["last_success_ts"] == record["last_success_ts"]
    assert metrics(env)[("smt_ingest_last_pass_exit_code", ())] == 1
    assert verdict(again, 3600) == "the last ingest pass failed (exit 1)"
    assert "no successful ingest pass" in verdict(
        {**record, "last_success_ts": time.time() - 7200}, 3600
    )


def test_post_command_leaves_the_same_record(env, inbox, smt_csv, webapp) -> None:
    path = smt_csv.write(inbox, name="manual.csv", esiid=ESIID)
    assert cli(["post", str(path)], env).returncode == 0
    record = spool.read_last_result(Path(env["SMT_SPOOL_DIR"]))
    assert record is not None and record["trigger"] == "post"
    assert [(f["path"], f["outcome"]) for f in record["files"]] == [("manual.csv", "posted")]
    assert metrics(env)[("smt_ingest_last_pass_info", (("trigger", "post"),))] == 1


def test_an_unwritable_metrics_dir_never_fails_a_pass(env, inbox, smt_csv, webapp) -> None:
    smt_csv.write(inbox, name=f"a_{ESIID}.csv", esiid=ESIID)
    result = run_pass({**env, "SMT_METRICS_DIR": str(inbox / "no" / "such")}, sync=False)
    assert result.exit_code == 0 and result.counts() == {"posted": 1}


@pytest.mark.skipif(not (VENV_BIN / "ansible-playbook").exists(), reason="no ansible-playbook")
def test_a_module_pass_goes_to_the_journal_socket_and_the_record(
    tmp_path, env, inbox, smt_csv, webapp
) -> None:
    smt_csv.write(inbox, name=f"IntervalMeterUsage_{ESIID}_1.csv", esiid=ESIID)
    (inbox / "orphan.csv").write_bytes(b"A,B\n1,2\n")
    sock_path = tmp_path / "log.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(sock_path))
    journal.settimeout(0.2)
    args = {
        "base_url": env["INTELLIWATT_BASE_URL"],
        "admin_token": env["ADMIN_TOKEN"],
        "local_dir": str(inbox),
        "spool_dir": env["SMT_SPOOL_DIR"],
        "metrics_dir": env["SMT_METRICS_DIR"],
        "fail_on_retry": False,
    }
    plays = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": [{"name": "post", "smt_inline_post": args}],
        }
    ]
    try:
        proc, parsed = run_playbook(
            tmp_path, plays, extra_env={"SMT_SYSLOG_SOCKET": str(sock_path)}
        )
        lines = []
        while True:
            try:
                lines.append(journal.recv(65536).decode())
            except TimeoutError:
                break
    finally:
        journal.close()
    assert proc.returncode == 0, proc.stdout[-2000:]
    res = task_results(parsed)["post"]
    assert res["exit_code"] == 0 and [f["path"] for f in res["needs_operator"]] == ["orphan.csv"]
    assert any(
        line.startswith("<30>smt-ingest: INFO posted IntervalMeterUsage_") for line in lines
    ), lines
    assert any("smt-ingest: WARNING no-esiid orphan.csv needs an operator" in x for x in lines)
    assert any("smt-ingest: INFO summary posted=1" in line for line in lines), lines
    assert env["ADMIN_TOKEN"] not in "".join(lines)
    record = json.loads((Path(env["SMT_SPOOL_DIR"]) / "status" / "last-ingest.json").read_text())
    assert record["trigger"] == "ansible" and record["exit_code"] == 0
    assert metrics(env)[("smt_ingest_last_pass_info", (("trigger", "ansible"),))] == 1


def test_every_metric_the_rules_use_is_written(tmp_path) -> None:
    """The alerting rules in monitoring/ name only metrics the pass (or the servers) write."""
    import re

    from helpers import REPO

    from smt_droplet.metrics import write_pass_metrics

    rules = (REPO / "monitoring" / "smt-droplet.rules.yml").read_text()
    used = set(re.findall(r"\b(smt_[a-z_]+[a-z])\b", rules))
    record = {
        "started_ts": 1.0,
        "finished_ts": 2.0,
        "exit_code": 0,
        "last_success_ts": 2.0,
        "needs_operator": 0,
        "free_bytes": 10,
        "skipped_no_space": 0,
        "waiting_for_app": 0,
        "counts": {},
    }
    target = write_pass_metrics(tmp_path, record)
    assert target is not None
    written = {f.name for f in text_string_to_metric_families(target.read_text())}
    ingest = {name for name in used if name.startswith("smt_ingest_")}
    assert ingest and ingest <= written, ingest - written


def test_the_metrics_file_is_readable_by_node_exporter(env, inbox, smt_csv, webapp) -> None:
    """The units run with UMask=0007; node_exporter runs as its own user and must read the file
    (0660 made Debian's node_exporter report node_textfile_scrape_error 1)."""
    smt_csv.write(inbox, name=f"a_{ESIID}.csv", esiid=ESIID)
    old = os.umask(0o007)
    try:
        assert run_pass(env, sync=False).exit_code == 0
    finally:
        os.umask(old)
    target = Path(env["SMT_METRICS_DIR"]) / "smt_ingest.prom"
    assert target.stat().st_mode & 0o777 == 0o644
