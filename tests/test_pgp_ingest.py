"""PGP deliveries through the whole ingest pass: real sshd, real gpg, the strict web-app double.

Keys are generated here (``pgp_keys.py``); nothing secret is committed. Every test checks that
the parent of the private plaintext directories (``SMT_PGP_TMPDIR``) is empty afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from helpers import cli, fast_env, sha256
from pgp_keys import Keyring, encrypt_to, make_zip, new_keyring, stop_agents

from smt_droplet.ingest import run_pass
from smt_droplet.ledger import Ledger, read_posted_digests
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer
from testbed.smt_csv import generate_interval_csv

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg not installed")

ESIID = "10443720000000099"
MEMBER_ESIID = "10443720000000055"
CONTENT_ESIID = "10443720000000066"
BILLING_ESIID = "10443720000000077"
OLD = time.time() - 3600
MiB = 1024 * 1024


def interval_csv(esiid: str = ESIID, days: int = 1) -> bytes:
    return generate_interval_csv(esiid, date(2025, 11, 1), days)


BILLING_CSV = (
    f"ESIID,BILL_START,BILL_END,KWH\r\n'{BILLING_ESIID},10/1/2025,10/31/2025,812\r\n".encode()
)


@dataclass(frozen=True)
class Keys:
    droplet: Keyring
    other: Keyring
    empty: Path  # a GnuPG home without any key


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    root = Path(tempfile.mkdtemp(prefix="gpgi", dir="/tmp"))  # short: agent socket path
    empty = root / "empty"
    empty.mkdir(mode=0o700)
    made = Keys(new_keyring(root, "droplet"), new_keyring(root, "other"), empty)
    try:
        yield made
    finally:
        stop_agents((made.droplet.home, made.other.home, empty))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pgp_tmp(tmp_path: Path) -> Iterator[Path]:
    """``SMT_PGP_TMPDIR``: must hold nothing after any pass."""
    path = tmp_path / "pgp-tmp"
    path.mkdir()
    yield path
    assert list(path.iterdir()) == [], "plaintext left behind"


@pytest.fixture
def env(ingest_env: dict[str, str], keys: Keys, pgp_tmp: Path) -> dict[str, str]:
    return fast_env(
        ingest_env,
        post_retries=1,
        SMT_GNUPG_HOME=str(keys.droplet.home),
        SMT_PGP_TMPDIR=str(pgp_tmp),
        SMT_PGP_MAX_BYTES=str(4 * MiB),
        SMT_GPG_TIMEOUT="30",
    )


def put(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path


def status_rows(env: dict[str, str]) -> dict[str, dict]:
    proc = cli(["status", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return {row["path"]: row for row in json.loads(proc.stdout)["files"]}


def no_gpg(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The same environment with a GnuPG home that does not exist: any decrypt attempt would
    end as ``failed-will-retry pgp:decrypt_failed``, so a clean skip proves none was made."""
    return {**env, "SMT_GNUPG_HOME": str(tmp_path / "no-such-gnupg-home")}


# ------------------------------------------------------------------------------------ tests


def test_delivery_posts_the_interval_csv_once(
    env, keys, sftp_peer: SftpPeer, webapp: IntelliWattDouble, inbox, tmp_path
) -> None:
    interval = interval_csv()
    member = f"reports/IntervalMeterUsage_{ESIID}_20251101.csv"
    # The billing CSV comes first in the zip and carries another ESIID: it must not be posted.
    payload = make_zip([("BillingData.csv", BILLING_CSV), (member, interval)])
    armored = encrypt_to(keys.droplet, payload)
    asc_name = f"IntervalMeterUsage_{ESIID}_20251101.asc"
    put(sftp_peer.root, asc_name, armored)

    first = run_pass(env)
    assert first.exit_code == 0, first.summary_line()
    assert first.counts() == {"posted": 1}
    assert first.files[0].member == member and first.files[0].sha256 == sha256(armored)
    posted = webapp.posted()
    assert len(posted) == 1 and len(webapp.requests()) == 1
    record = posted[0]
    assert record["filename"] == f"IntervalMeterUsage_{ESIID}_20251101.csv"
    assert record["content"] == interval
    assert (record["esiid"], record["meter"]) == (ESIID, "M1")
    assert BILLING_CSV not in [r["content"] for r in webapp.received()]

    # Ledger: the .asc digest (what the next pass looks up) and the CSV's, one line each.
    lines = (inbox / ".posted_sha256").read_text().splitlines()
    assert sorted(lines) == sorted([sha256(armored), sha256(interval)])
    ledger = Ledger.load(inbox / ".posted_sha256")
    assert ledger.apps[sha256(armored)]["member"] == member
    assert ledger.apps[sha256(armored)]["csv_sha256"] == sha256(interval)
    # No plaintext in the inbox: only the mirrored .asc and the ledger's dot files.
    assert sorted(p.name for p in inbox.iterdir() if not p.name.startswith(".")) == [asc_name]

    row = status_rows(env)[asc_name]
    assert (row["state"], row["via"], row["member"]) == ("posted", "pgp", member)
    assert row["csv_sha256"] == sha256(interval) and row["app_id"] == record["id"]
    human = cli(["status"], env).stdout
    assert f"pgp-member={member}" in human

    # Second pass: nothing posted, nothing decrypted (a decrypt attempt would fail here).
    second = run_pass(no_gpg(env, tmp_path))
    assert second.exit_code == 0 and second.counts() == {"skipped-already-posted": 1}
    assert len(webapp.requests()) == 1

    # The same interval CSV arriving later in plain text is already posted.
    put(inbox, "again.csv", interval)
    third = run_pass(no_gpg(env, tmp_path), sync=False)
    assert third.counts() == {"skipped-already-posted": 2} and len(webapp.requests()) == 1
    assert len((inbox / ".posted_sha256").read_text().splitlines()) == 2


def test_esiid_from_member_name_then_csv_column_and_meter(
    env, keys, webapp: IntelliWattDouble, inbox
) -> None:
    in_member = make_zip(
        [(f"IntervalMeterUsage_{MEMBER_ESIID}_M2.csv", interval_csv(CONTENT_ESIID))]
    )
    in_content = make_zip([("usage/interval.csv", interval_csv(CONTENT_ESIID, days=2))])
    put(inbox, "export.CSV.1.asc", encrypt_to(keys.droplet, in_member))
    put(inbox, "sub/export.CSV.2.asc", encrypt_to(keys.droplet, in_content))
    result = run_pass(env, sync=False)
    assert result.counts() == {"posted": 2}, result.summary_line()
    got = {r["filename"]: (r["esiid"], r["meter"]) for r in webapp.posted()}
    assert got == {
        f"IntervalMeterUsage_{MEMBER_ESIID}_M2.csv": (MEMBER_ESIID, "M2"),
        "interval.csv": (CONTENT_ESIID, "M1"),
    }


def make_bomb() -> bytes:
    """16 MiB of zeros deflated to ~16 KB beside a real interval CSV (cap is 4 MiB)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("interval.csv", interval_csv())
        with zf.open("zeros.csv", "w") as entry:
            for _ in range(16):
                entry.write(bytes(MiB))
    return buf.getvalue()


def test_undeliverable_files_are_rejected_with_their_reason(
    env, keys, sftp_peer: SftpPeer, webapp: IntelliWattDouble, inbox, tmp_path
) -> None:
    good = encrypt_to(keys.droplet, make_zip([("interval.csv", interval_csv())]))
    lines = good.decode().splitlines()
    body = list(lines[2])
    body[10] = "A" if body[10] != "A" else "B"
    corrupt = "\n".join([*lines[:2], "".join(body), *lines[3:]]) + "\n"
    cases = {
        f"IntervalMeterUsage_{ESIID}_other.asc": (
            encrypt_to(keys.other, make_zip([("interval.csv", interval_csv())])),
            "pgp:wrong_key: encrypted to 0x",
        ),
        f"IntervalMeterUsage_{ESIID}_corrupt.asc": (corrupt.encode(), "pgp:corrupt_armor: "),
        f"IntervalMeterUsage_{ESIID}_bomb.asc": (
            encrypt_to(keys.droplet, make_bomb()),
            "pgp:zip_too_large: uncompressed size",
        ),
        f"DailyMeterUsage_{ESIID}_nocsv.asc": (
            encrypt_to(keys.droplet, make_zip([("report.txt", b"hello")])),
            "pgp:no_csv_inside: no .csv entry among 1 (report.txt)",
        ),
    }
    for name, (data, _) in cases.items():
        put(sftp_peer.root, name, data)

    started = time.monotonic()
    first = run_pass(env)
    assert time.monotonic() - started < 10
    assert first.exit_code == 0, first.summary_line()  # deliberate skips, nothing to retry
    assert first.counts() == {"rejected": 4}
    assert webapp.requests() == []
    reasons = {f.path: f.reason for f in first.files}
    for name, (_, expected) in cases.items():
        assert reasons[name].startswith(expected), reasons[name]

    rows = status_rows(env)
    for name, (_, expected) in cases.items():
        assert rows[name]["state"] == "rejected"
        assert rows[name]["reason"].startswith(expected)
        assert rows[name]["via"] == "pgp"
    assert read_posted_digests(inbox / ".posted_sha256") == set()

    # Not retried (and not decrypted again) until the file changes or is forgotten.
    second = run_pass(no_gpg(env, tmp_path))
    assert second.counts() == {"skipped-rejected": 4} and webapp.requests() == []


def test_our_own_trouble_is_retried_and_no_key_is_fixed_by_forget(
    env, keys, webapp: IntelliWattDouble, inbox, tmp_path
) -> None:
    interval = interval_csv()
    asc = put(
        inbox,
        f"IntervalMeterUsage_{ESIID}_x.asc",
        encrypt_to(keys.droplet, make_zip([("IntervalData.csv", interval)])),
    )
    # GnuPG home missing: not the file's fault → failed-will-retry, exit 1, shown in status.
    first = run_pass(no_gpg(env, tmp_path), sync=False)
    assert first.exit_code == 1 and first.counts() == {"failed-will-retry": 1}
    assert first.files[0].reason.startswith("pgp:decrypt_failed: GnuPG home")
    row = status_rows(env)[asc.name]
    assert row["state"] == "failed-will-retry" and row["reason"].startswith("pgp:decrypt_failed")

    # The key is not in the keyring: the file is rejected (no_secret_key) ...
    second = run_pass({**env, "SMT_GNUPG_HOME": str(keys.empty)}, sync=False)
    assert second.counts() == {"rejected": 1}
    assert second.files[0].reason.startswith("pgp:no_secret_key: ")
    assert run_pass(env, sync=False).counts() == {"skipped-rejected": 1}
    # ... until the operator has imported the key and forgets the file.
    assert cli(["forget", str(asc)], env).returncode == 0
    third = run_pass(env, sync=False)
    assert third.counts() == {"posted": 1}
    assert [r["content"] for r in webapp.posted()] == [interval]
    assert status_rows(env)[asc.name]["state"] == "posted"


def test_app_rejection_of_the_extracted_csv_is_kept_on_the_asc(
    env, keys, webapp: IntelliWattDouble, inbox
) -> None:
    member = f"IntervalMeterUsage_{ESIID}.csv"
    asc = put(inbox, "d.CSV.1.asc", encrypt_to(keys.droplet, make_zip([(member, interval_csv())])))
    webapp.fail_next(1, 400, body={"ok": False, "error": "INLINE_SIZE_MISMATCH"})
    first = run_pass(env, sync=False)
    assert first.counts() == {"rejected": 1} and first.files[0].reason.startswith(
        "INLINE_SIZE_MISMATCH: "
    )
    row = status_rows(env)[asc.name]
    assert (row["state"], row["reason"], row["member"]) == (
        "rejected",
        first.files[0].reason,
        member,
    )
    assert run_pass(env, sync=False).counts() == {"skipped-rejected": 1}
    assert len(webapp.requests()) == 1


def test_module_check_mode_does_not_decrypt_then_posts(
    env, keys, webapp: IntelliWattDouble, inbox, tmp_path, pgp_tmp
) -> None:
    from test_modules import VENV_BIN, local_play, run_playbook, task_results

    if not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("ansible-playbook not in .venv")
    member = "IntervalMeterUsage_M3.csv"
    put(
        inbox,
        f"IntervalMeterUsage_{ESIID}_m.asc",
        encrypt_to(keys.droplet, make_zip([(member, interval_csv())])),
    )
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(
        f"ADMIN_TOKEN={webapp.admin_token}\nINTELLIWATT_BASE_URL={webapp.url}\n"
        f"SMT_LOCAL_DIR={inbox}\nSMT_PGP_TMPDIR={pgp_tmp}\n"
    )
    task = {"smt_inline_post": {"env_file": str(env_file), "gnupg_home": str(keys.droplet.home)}}
    plays = local_play([{"name": "post", **task}])
    proc, parsed = run_playbook(tmp_path, plays, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)["post"]["results"]
    assert [(r["outcome"], r["esiid"], r["member"]) for r in res] == [("would-post", ESIID, None)]
    assert "not decrypted" in res[0]["reason"]
    assert webapp.requests() == [] and list(pgp_tmp.iterdir()) == []

    proc, parsed = run_playbook(tmp_path, plays)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = task_results(parsed)["post"]["results"]
    assert [(r["outcome"], r["member"]) for r in res] == [("posted", member)]
    assert [(r["filename"], r["esiid"], r["meter"]) for r in webapp.posted()] == [
        (member, ESIID, "M3")
    ]


def test_cli_post_of_a_delivery_with_an_operator_esiid(
    env, keys, webapp: IntelliWattDouble, inbox
) -> None:
    member = f"IntervalMeterUsage_{MEMBER_ESIID}.csv"
    asc = put(inbox, "manual.asc", encrypt_to(keys.droplet, make_zip([(member, interval_csv())])))
    proc = cli(["post", str(asc), "--esiid", CONTENT_ESIID, "--meter", "M7"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"pgp-member={member}" in proc.stderr
    # The operator's ESIID beats the member's name; the CSV goes out under the member's name.
    assert [(r["filename"], r["esiid"], r["meter"]) for r in webapp.posted()] == [
        (member, CONTENT_ESIID, "M7")
    ]
    again = cli(["post", str(asc)], env)
    assert again.returncode == 0 and "skipped-already-posted" in again.stderr
    assert len(webapp.requests()) == 1
