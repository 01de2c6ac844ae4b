"""The two Ansible modules and playbooks/ingest-now.yml, run through ansible-playbook.

``connection: local`` against localhost, and ONLY for these two modules: they touch nothing but
the inbox, ledger and known_hosts paths the tests give them (all under tmp_path). No role is
ever applied this way. The package reaches the module through AnsiballZ/module_utils, exactly
as on a droplet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, VENV_BIN, run_playbook, task_results

from smt_droplet.ledger import read_posted_digests
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer

ESIID = "10443720000000011"
CONTENT_ESIID = "10443720000000022"
OLD = time.time() - 3600

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ansible-playbook").exists(), reason="ansible-playbook not in .venv"
)


def local_play(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": tasks}]


@pytest.fixture
def remote(sftp_peer: SftpPeer, smt_csv) -> dict[str, Path]:
    named = smt_csv.write(sftp_peer.root, name=f"IntervalMeterUsage_{ESIID}_1.csv", seed=1)
    inner = smt_csv.write(sftp_peer.root, name="sub/export_M3.csv", esiid=CONTENT_ESIID, seed=2)
    for p in (named, inner):
        os.utime(p, (OLD, OLD))
    return {"named": named, "inner": inner}


def sync_args(peer: SftpPeer, inbox: Path) -> dict[str, Any]:
    return {
        "host": peer.host,
        "port": peer.port,
        "user": peer.user,
        "key": str(peer.user_key),
        "known_hosts": str(peer.known_hosts),
        "remote_dir": str(peer.root),
        "local_dir": str(inbox),
        "include": ["*.csv"],
    }


def post_args(webapp: IntelliWattDouble, inbox: Path) -> dict[str, Any]:
    return {
        "base_url": webapp.url,
        "admin_token": webapp.admin_token,
        "local_dir": str(inbox),
        "state_file": str(inbox / ".posted_sha256"),
        "retries": 1,
    }


def test_ansible_doc_renders_both_modules() -> None:
    for name, option in (
        ("smt_sftp_sync", "host_key_policy"),
        ("smt_inline_post", "max_body_bytes"),
    ):
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-doc"), "-M", "library", name],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
        )
        assert proc.returncode == 0, proc.stderr
        assert option in proc.stdout and "EXAMPLES" in proc.stdout and "RETURN" in proc.stdout


def test_sync_and_post_check_mode_then_real(tmp_path, sftp_peer, webapp, inbox, remote) -> None:
    plays = local_play(
        [
            {"name": "sync", "smt_sftp_sync": sync_args(sftp_peer, inbox), "register": "s"},
            {"name": "post", "smt_inline_post": post_args(webapp, inbox), "register": "p"},
        ]
    )
    proc, parsed = run_playbook(tmp_path, plays, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)
    assert res["sync"]["changed"] is True
    assert sorted(res["sync"]["downloaded"]) == [remote["named"].name, "sub/export_M3.csv"]
    assert {f["status"] for f in res["sync"]["files"]} == {"would-download"}
    assert res["post"]["changed"] is False and res["post"]["results"] == []
    assert list(inbox.iterdir()) == [] and webapp.requests() == []

    proc, parsed = run_playbook(tmp_path, plays)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)
    assert res["sync"]["changed"] is True and len(res["sync"]["downloaded"]) == 2
    posted = {r["path"]: r for r in res["post"]["results"]}
    assert res["post"]["changed"] is True and res["post"]["summary"] == {"posted": 2}
    assert posted[remote["named"].name]["esiid"] == ESIID
    assert posted["sub/export_M3.csv"]["esiid"] == CONTENT_ESIID
    assert posted["sub/export_M3.csv"]["meter"] == "M3"
    assert posted["sub/export_M3.csv"]["app_id"] is not None
    assert len(webapp.received()) == 2
    assert any(line.startswith("INFO posted ") for line in res["post"]["log"])
    assert webapp.admin_token not in proc.stdout + proc.stderr

    proc, parsed = run_playbook(tmp_path, plays)
    res = task_results(parsed)
    assert res["sync"]["changed"] is False and res["post"]["changed"] is False
    assert res["post"]["summary"] == {"skipped-already-posted": 2}
    assert len(webapp.requests()) == 2


def test_post_with_env_file_check_mode_and_token_never_shown(
    tmp_path, webapp, inbox, smt_csv
) -> None:
    smt_csv.write(inbox, name=f"upload_{ESIID}.csv", seed=5)
    (inbox / "anon.csv").write_bytes(b"USAGE_DATE,USAGE_KWH\n3/8/2025,1.0\n")
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(
        f"ADMIN_TOKEN='{webapp.admin_token}'\nINTELLIWATT_BASE_URL={webapp.url}\n"
        f"SMT_LOCAL_DIR={inbox}\nESIID_DEFAULT={CONTENT_ESIID}\nMETER_DEFAULT=M9\n"
    )
    state = tmp_path / "state" / "posted"
    state.parent.mkdir()
    task = {"smt_inline_post": {"env_file": str(env_file), "state_file": str(state)}}
    plays = local_play([{"name": "post", **task, "register": "p"}])
    proc, parsed = run_playbook(tmp_path, plays, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)["post"]
    assert res["changed"] is True
    assert {r["outcome"] for r in res["results"]} == {"would-post"}
    assert webapp.requests() == [] and not state.exists()
    assert webapp.admin_token not in proc.stdout + proc.stderr

    proc, _ = run_playbook(tmp_path, plays, "-vvv", json_output=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert webapp.admin_token not in proc.stdout + proc.stderr
    got = {r["filename"]: (r["esiid"], r["meter"]) for r in webapp.received()}
    assert got == {f"upload_{ESIID}.csv": (ESIID, "M9"), "anon.csv": (CONTENT_ESIID, "M9")}
    assert len(read_posted_digests(state)) == 2


def test_post_401_fails_the_task_and_leaves_ledger(tmp_path, webapp, inbox, smt_csv) -> None:
    smt_csv.write(inbox, name=f"upload_{ESIID}.csv")
    args = {**post_args(webapp, inbox), "admin_token": "wrong-token-xyz-123"}
    proc, parsed = run_playbook(tmp_path, local_play([{"name": "post", "smt_inline_post": args}]))
    assert proc.returncode != 0
    res = task_results(parsed)["post"]
    assert res["failed"] is True and "HTTP 401" in res["msg"]
    assert "wrong-token-xyz-123" not in proc.stdout + proc.stderr
    assert not (inbox / ".posted_sha256").exists()


def test_sync_refuses_changed_host_key(tmp_path, sftp_peer, inbox, remote) -> None:
    sftp_peer.rotate_host_key()
    plays = local_play([{"name": "sync", "smt_sftp_sync": sync_args(sftp_peer, inbox)}])
    proc, parsed = run_playbook(tmp_path, plays)
    assert proc.returncode != 0
    res = task_results(parsed)["sync"]
    assert "host key refused" in res["msg"] and "CHANGED" in res["msg"]
    assert [p.name for p in inbox.iterdir()] == [".posted_sha256.lock"]


@pytest.mark.skipif(
    subprocess.run(["/usr/bin/python3", "-c", "import paramiko"], capture_output=True).returncode
    == 0,
    reason="the system python has paramiko",
)
def test_missing_paramiko_names_the_package(tmp_path, sftp_peer, inbox) -> None:
    plays = local_play([{"name": "sync", "smt_sftp_sync": sync_args(sftp_peer, inbox)}])
    _, parsed = run_playbook(tmp_path, plays, python="/usr/bin/python3")
    res = task_results(parsed)["sync"]
    assert res["failed"] is True and "python3-paramiko" in res["msg"]


def test_ingest_now_playbook_check_then_real(tmp_path, sftp_peer, webapp, inbox, remote) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    settings = {
        "ADMIN_TOKEN": webapp.admin_token,
        "INTELLIWATT_BASE_URL": webapp.url,
        **sftp_peer.env(),
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_POST_RETRIES": "1",
        "SMT_RETRY_BASE_DELAY": "0.01",
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "smt": {
                            "hosts": {
                                "testdroplet": {
                                    "ansible_connection": "local",
                                    "smt_ingest_now_become": False,
                                    "smt_ingest_env_file": str(env_file),
                                    "smt_ingest_state_file": str(tmp_path / "ledger"),
                                }
                            }
                        }
                    }
                }
            }
        )
    )
    playbook = REPO / "playbooks" / "ingest-now.yml"
    proc, _ = run_playbook(
        tmp_path, playbook, "--check", inventory=str(inventory), json_output=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"would-download {remote['named'].name}" in proc.stdout
    assert webapp.requests() == [] and list(inbox.iterdir()) == []

    proc, _ = run_playbook(tmp_path, playbook, inventory=str(inventory), json_output=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"posted {remote['named'].name} esiid={ESIID}" in proc.stdout
    assert f"posted sub/export_M3.csv esiid={CONTENT_ESIID} meter=M3" in proc.stdout
    assert webapp.admin_token not in proc.stdout + proc.stderr
    assert len(read_posted_digests(tmp_path / "ledger")) == 2

    webapp.fail_next(5, 500)
    smt_file = sftp_peer.root / f"IntervalMeterUsage_{ESIID}_new.csv"
    shutil.copy(remote["named"], smt_file)
    smt_file.write_bytes(smt_file.read_bytes() + b"\n")
    os.utime(smt_file, (OLD, OLD))
    proc, _ = run_playbook(tmp_path, playbook, inventory=str(inventory), json_output=False)
    assert proc.returncode != 0
    assert "failed-will-retry" in proc.stdout and "left to retry" in proc.stdout, proc.stdout[
        -3000:
    ]


def test_post_only_given_paths_and_force(tmp_path, webapp, inbox, smt_csv) -> None:
    one = smt_csv.write(inbox, name=f"one_{ESIID}.csv", seed=1)
    smt_csv.write(inbox, name=f"two_{ESIID}.csv", seed=2)
    args = {**post_args(webapp, inbox), "paths": [str(one)]}
    plays = local_play([{"name": "post", "smt_inline_post": args}])
    proc, parsed = run_playbook(tmp_path, plays)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)["post"]
    assert [(r["path"], r["outcome"]) for r in res["results"]] == [(one.name, "posted")]
    assert [r["filename"] for r in webapp.received()] == [one.name]

    proc, parsed = run_playbook(tmp_path, plays)
    assert task_results(parsed)["post"]["changed"] is False

    forced = local_play([{"name": "post", "smt_inline_post": {**args, "force": True}}])
    proc, parsed = run_playbook(tmp_path, forced)
    res = task_results(parsed)["post"]
    assert res["changed"] is True and res["results"][0]["outcome"] == "duplicate"
    assert len(webapp.requests()) == 2
