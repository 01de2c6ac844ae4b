"""Bad input loses nothing: full disks, dropped and stalled SFTP connections, bad settings.

Each test shows the outcome a failure must have: a clear error naming the file and the cause,
nothing lost, nothing half-written, and a later pass that finishes the job exactly once.

Full disks are real: a small tmpfs is mounted over the directory under test (needs root, which
CI has; without root these tests are skipped with that reason). Dropped connections are real
too: the SFTP peer's per-connection sshd processes are SIGKILLed (or SIGSTOPped for a stall)
while a download is in flight.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from helpers import cli, fast_env, sha256
from serverproc import ServerProcess

from smt_droplet import spool
from smt_droplet.config import SftpSettings
from smt_droplet.ingest import run_pass
from smt_droplet.ledger import read_posted_digests
from smt_droplet.sftp_mirror import MirrorResult, mirror
from testbed.intelliwatt_double import IntelliWattDouble
from testbed.sftp_peer import SftpPeer, _descendants

ESIID = "10443720000000011"
OLD = time.time() - 3600
UPLOAD_TOKEN = "upload-token-for-failure-tests"
WEBHOOK_SECRET = "webhook-secret-for-failure-tests"

Mount = Callable[..., Path]


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """``tmpfs(path, size="1m")`` mounts a fresh tmpfs on ``path``; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "1m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("full-disk tests mount a small tmpfs, which needs root (CI runs as root)")
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"mount tmpfs on {path}: {proc.stderr.strip()}"
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill ``directory``'s filesystem up to ``leave`` free bytes with a dot file (never posted,
    never mirrored over); delete the returned path to free the space again."""
    filler = directory / ".filler"
    with open(filler, "ab") as fh:
        want = free_bytes(directory) - leave
        try:
            while want > 0:
                fh.write(b"\0" * min(want, 1 << 20))
                fh.flush()
                want = free_bytes(directory) - leave
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    assert free_bytes(directory) <= max(leave, 0) + 4096
    return filler


def put_remote(peer: SftpPeer, smt_csv, name: str, days: int = 1, seed: int = 0) -> str:
    path = smt_csv.write(peer.root, name=name, esiid=ESIID, days=days, seed=seed)
    os.utime(path, (OLD, OLD))
    return sha256(path.read_bytes())


def leftovers(directory: Path) -> list[str]:
    """Temp files of any writer of ours: download partials, upload parts, spool temp files."""
    names = []
    for path in directory.rglob("*"):
        n = path.name
        if n.endswith((".partial", ".part", ".tmp")):
            names.append(str(path.relative_to(directory)))
    return sorted(names)


def stored_once(webapp: IntelliWattDouble, digests: set[str]) -> None:
    """The app stored each digest exactly once (duplicate answers are not stores)."""
    assert Counter(r["sha256"] for r in webapp.posted()) == Counter(digests)


@pytest.fixture
def env(ingest_env: dict[str, str]) -> dict[str, str]:
    # The free-space guard off: these disks really fill (the guard: tests/test_lifecycle.py).
    return fast_env(ingest_env, post_retries=1, sftp_retries=2, lock_wait=10, SMT_MIN_FREE_MB="0")


# -- 1. full disk: the SFTP mirror ---------------------------------------------------------


def test_full_inbox_fails_the_download_cleanly_and_the_next_pass_posts_it_once(
    env, sftp_peer, smt_csv, webapp, inbox, tmpfs
) -> None:
    tmpfs(inbox, "1m")
    old_name = f"IntervalMeterUsage_{ESIID}_old.csv"
    new_name = f"IntervalMeterUsage_{ESIID}_new.csv"
    old_digest = put_remote(sftp_peer, smt_csv, old_name, seed=1)
    first = run_pass(env)
    assert first.exit_code == 0, first.summary_line()
    old = inbox / old_name
    before = (old.stat().st_ino, old.stat().st_mtime_ns, old.read_bytes())
    ledger_before = (inbox / ".posted_sha256").read_bytes()

    new_digest = put_remote(sftp_peer, smt_csv, new_name, days=20, seed=2)  # ~150 KB
    filler = fill(inbox, leave=32 * 1024)
    proc = cli(["ingest"], env)
    assert proc.returncode == 1, proc.stderr
    failed_lines = [line for line in proc.stderr.splitlines() if "download-failed" in line]
    assert len(failed_lines) == 1, proc.stderr
    assert new_name in failed_lines[0] and "No space left on device (ENOSPC)" in failed_lines[0]
    assert "sync-failed" in proc.stderr and "exit=1" in proc.stderr
    assert not (inbox / new_name).exists()
    assert leftovers(inbox) == []  # no .partial
    assert (old.stat().st_ino, old.stat().st_mtime_ns, old.read_bytes()) == before
    assert (inbox / ".posted_sha256").read_bytes() == ledger_before
    assert len(webapp.requests()) == 1  # nothing new was posted

    filler.unlink()
    again = run_pass(env)
    assert again.exit_code == 0, again.summary_line()
    assert [f.rel for f in again.sync.downloaded] == [new_name]
    assert again.counts() == {"posted": 1, "skipped-already-posted": 1}
    assert sha256((inbox / new_name).read_bytes()) == new_digest
    stored_once(webapp, {old_digest, new_digest})
    assert read_posted_digests(inbox / ".posted_sha256") == {old_digest, new_digest}
    assert leftovers(inbox) == []


# -- 1. full disk: the upload server -------------------------------------------------------


def csv_bytes(rows: int, seed: int = 0) -> bytes:
    lines = ["ESIID,USAGE_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH"]
    lines += [
        f"'{ESIID},11/1/2025,{i // 4}:{i % 4 * 15:02d},x,{(seed + i) % 97}" for i in range(rows)
    ]
    return ("\n".join(lines) + "\n").encode()


def upload_env(root: Path, inbox: Path, spool_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_SPOOL_DIR": str(spool_dir),
        "SMT_UPLOAD_STATE": str(root / "state" / "ratelimit.sqlite3"),
        "SMT_UPLOAD_BIND": "127.0.0.1",
        "SMT_UPLOAD_PORT": "0",
        "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
        "SMT_UPLOAD_MAX_BYTES": "400000",
        "SMT_SHUTDOWN_GRACE": "1",
        "SMT_MIN_FREE_MB": "0",  # the guard off: the disk really fills (guard: test_upload.py)
        **extra,
    }


def upload(server: ServerProcess, data: bytes, name: str = "usage.csv") -> requests.Response:
    return requests.post(
        server.url("/upload"),
        files={"file": (name, data, "text/csv")},
        headers={
            "x-smt-upload-token": UPLOAD_TOKEN,
            "x-smt-upload-role": "admin",
            "x-smt-upload-account-key": "ops",
        },
        timeout=20,
    )


def queued(spool_dir: Path) -> list[str]:
    queue = spool_dir / "queue"
    return sorted(p.name for p in queue.glob("*.json")) if queue.is_dir() else []


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.ensure_stopped()


def test_upload_into_a_full_inbox_is_507_and_gives_the_slot_back(
    tmp_path: Path, tmpfs, servers
) -> None:
    inbox = tmpfs(tmp_path / "inbox", "512k")
    spool_dir = tmp_path / "spool"
    # One admin upload a day: a 507 that kept its slot would make the retry a 429.
    env = upload_env(tmp_path, inbox, spool_dir, SMT_ADMIN_UPLOAD_DAILY_LIMIT="1")
    server = ServerProcess("upload-server", env, tmp_path / "upload.log").start()
    servers.append(server)
    data = csv_bytes(6000)  # ~200 KB
    filler = fill(inbox, leave=64 * 1024)

    r = upload(server, data)
    assert r.status_code == 507, r.text
    assert r.json()["error"] == "storage_failed"
    assert sorted(os.listdir(inbox)) == [".filler"]  # no .upload-*.part left
    assert queued(spool_dir) == []
    log = server.wait_for_log("cannot store upload")
    assert "No space left on device" in log and UPLOAD_TOKEN not in log

    filler.unlink()
    r = upload(server, data)
    assert r.status_code == 202, r.text  # the slot was given back
    stored = r.json()["filename"]
    assert (inbox / stored).read_bytes() == data
    assert len(queued(spool_dir)) == 1
    assert upload(server, csv_bytes(10, seed=1)).status_code == 429  # and now it is used


def test_upload_with_a_full_spool_stores_the_file_and_leaves_no_temp_request(
    tmp_path: Path, tmpfs, servers
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spool_dir = tmpfs(tmp_path / "spool", "256k")
    env = upload_env(tmp_path, inbox, spool_dir)
    server = ServerProcess("upload-server", env, tmp_path / "upload.log").start()
    servers.append(server)
    fill(spool_dir)
    data = csv_bytes(50)
    r = upload(server, data)
    # The file is stored (the timer's next pass posts it); the caller learns it was not queued.
    assert r.status_code == 202, r.text
    assert r.json()["stored"] is True and r.json()["queued"] is False
    assert (inbox / r.json()["filename"]).read_bytes() == data
    assert queued(spool_dir) == []
    assert leftovers(spool_dir) == []  # no half-written request in tmp/
    assert "cannot queue an ingest request" in server.wait_for_log("cannot queue")


# -- 1. full disk: the webhook ----------------------------------------------------------------


def test_webhook_with_a_full_spool_is_503_and_writes_nothing(
    tmp_path: Path, tmpfs, servers
) -> None:
    spool_dir = tmpfs(tmp_path / "spool", "256k")
    env = {
        "INTELLIWATT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SMT_SPOOL_DIR": str(spool_dir),
        "SMT_WEBHOOK_BIND": "127.0.0.1",
        "SMT_WEBHOOK_PORT": "0",
        "SMT_SHUTDOWN_GRACE": "1",
    }
    server = ServerProcess("webhook-server", env, tmp_path / "webhook.log").start()
    servers.append(server)
    url = server.url("/trigger/smt-now")
    headers = {"x-intelliwatt-secret": WEBHOOK_SECRET}
    assert requests.post(url, json={"reason": "before"}, headers=headers, timeout=10).ok
    (earlier,) = queued(spool_dir)
    earlier_bytes = (spool_dir / "queue" / earlier).read_bytes()

    filler = fill(spool_dir)
    r = requests.post(url, json={"reason": "disk full"}, headers=headers, timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "spool_unavailable"
    assert queued(spool_dir) == [earlier]
    assert (spool_dir / "queue" / earlier).read_bytes() == earlier_bytes
    assert leftovers(spool_dir) == []  # nothing half-written in tmp/ or queue/
    log = server.wait_for_log("cannot queue ingest request")
    assert "No space left on device" in log and WEBHOOK_SECRET not in log

    filler.unlink()
    r = requests.post(url, json={"reason": "after"}, headers=headers, timeout=10)
    assert r.status_code == 202
    assert len(queued(spool_dir)) == 2


def test_enqueue_on_a_full_disk_raises_and_leaves_no_temp_file(tmp_path: Path, tmpfs) -> None:
    spool_dir = tmpfs(tmp_path / "spool", "64k")
    spool.ensure_layout(spool_dir)
    fill(spool_dir)
    with pytest.raises(spool.SpoolError, match="No space left on device"):
        spool.enqueue(spool_dir, "cli", reason="x" * 100)
    assert leftovers(spool_dir) == [] and queued(spool_dir) == []


# -- 1. full disk: the ledger after a 200 ---------------------------------------------------


def test_ledger_full_after_a_200_exits_1_and_the_next_pass_records_the_duplicate(
    env, smt_csv, webapp, inbox, tmp_path: Path, tmpfs
) -> None:
    """The app accepted the file but the ledger cannot record it. The pass must stop (every
    further post would be unrecorded too), exit 1 and say that the file was accepted; the next
    pass re-posts it, the app answers duplicate, and that is recorded."""
    state_dir = tmpfs(tmp_path / "state", "64k")
    state_file = state_dir / "posted_sha256"
    env = {**env, "STATE_FILE": str(state_file)}
    digests = {
        sha256(smt_csv.write(inbox, name=f"a{i}_{ESIID}.csv", esiid=ESIID, seed=i).read_bytes())
        for i in range(3)
    }
    filler = fill(state_dir)
    proc = cli(["ingest", "--no-sync"], env)
    assert proc.returncode == 1, proc.stderr
    assert len(webapp.received()) == 1  # stopped after the first unrecordable post
    accepted = webapp.received()[0]
    assert "No space left on device" in proc.stderr
    assert "accepted" in proc.stderr and accepted["filename"] in proc.stderr, proc.stderr
    assert "posted-unrecorded=1" in proc.stderr and "not-attempted=2" in proc.stderr
    assert "exit=1" in proc.stderr
    assert env["ADMIN_TOKEN"] not in proc.stderr
    assert read_posted_digests(state_file) == set()  # nothing recorded, nothing torn
    assert not state_file.exists() or state_file.read_bytes() == b""
    assert leftovers(state_dir) == []

    filler.unlink()
    again = run_pass(env, sync=False)
    assert again.exit_code == 0, again.summary_line()
    assert again.counts() == {"duplicate": 1, "posted": 2}
    stored_once(webapp, digests)
    assert read_posted_digests(state_file) == digests
    assert run_pass(env, sync=False).counts() == {"skipped-already-posted": 3}


def test_full_disk_with_room_for_ledger_lines_records_every_post_and_exits_1(
    env, smt_csv, webapp, inbox, tmp_path: Path, tmpfs
) -> None:
    """The ledger's last page still has room (appends succeed) but its sidecar cannot be
    rewritten: every accepted post is recorded, none is lost or repeated, and the pass still
    exits 1 naming the sidecar and ENOSPC so the full disk gets noticed."""
    state_dir = tmpfs(tmp_path / "state", "64k")
    state_file = state_dir / "posted_sha256"
    state_file.write_text("0" * 64 + "\n")
    env = {**env, "STATE_FILE": str(state_file)}
    digests = {
        sha256(smt_csv.write(inbox, name=f"b{i}_{ESIID}.csv", esiid=ESIID, seed=i).read_bytes())
        for i in range(3)
    }
    filler = fill(state_dir)
    proc = cli(["ingest", "--no-sync"], env)
    assert proc.returncode == 1, proc.stderr
    assert f"{state_file}.json" in proc.stderr and "No space left on device" in proc.stderr
    assert "ledger=failed exit=1" in proc.stderr
    assert read_posted_digests(state_file) == digests | {"0" * 64}
    stored_once(webapp, digests)
    assert leftovers(state_dir) == []

    filler.unlink()
    again = run_pass(env, sync=False)
    assert again.exit_code == 0 and again.counts() == {"skipped-already-posted": 3}
    assert len(webapp.requests()) == 3


# -- 3. configuration errors: exit 2 before any network traffic -----------------------------


def sshd_connections(peer: SftpPeer) -> int:
    return peer.log_file.read_text(errors="replace").count("Connection from")


def test_malformed_env_file_line_exits_2_naming_file_and_line(
    env, sftp_peer, webapp, tmp_path: Path
) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    lines = [f"{k}={v}" for k, v in env.items()]
    lines.insert(3, "export SMT_MIN_AGE 60")  # line 4: not KEY=value
    env_file.write_text("\n".join(lines) + "\n")
    seen = sshd_connections(sftp_peer)
    proc = cli(["ingest", "--env-file", str(env_file)], {})
    assert proc.returncode == 2, proc.stderr
    assert f"{env_file}:4:" in proc.stderr and "expected KEY=value" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert env["ADMIN_TOKEN"] not in proc.stderr
    assert webapp.requests() == [] and sshd_connections(sftp_peer) == seen


def test_env_file_syntax_error_names_the_key_never_the_value(
    env, sftp_peer, webapp, tmp_path: Path
) -> None:
    """A ``KEY: value`` line (YAML habits) used to print 40 characters of it: the token."""
    env_file = tmp_path / "intelliwatt-smt"
    lines = [f"{k}={v}" for k, v in env.items() if k != "ADMIN_TOKEN"]
    lines.insert(2, f"ADMIN_TOKEN: {env['ADMIN_TOKEN']}")  # line 3
    env_file.write_text("\n".join(lines) + "\n")
    proc = cli(["ingest", "--env-file", str(env_file)], {})
    assert proc.returncode == 2, proc.stderr
    assert f"{env_file}:3:" in proc.stderr and "ADMIN_TOKEN" in proc.stderr
    assert env["ADMIN_TOKEN"] not in proc.stderr
    assert env["ADMIN_TOKEN"][:8] not in proc.stderr
    assert webapp.requests() == []


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ({"ADMIN_TOKEN": "tok\u00e9n-with-an-accent-0123456789"}, "non-ASCII character"),
        ({"ADMIN_TOKEN": "token-line-one\ntoken-line-two"}, "control character"),
        ({"ADMIN_TOKEN": "t\u2013dash-is-not-latin-1"}, "non-ASCII character"),
        ({"INTELLIWATT_BASE_URL": "http://app.example.com"}, "SMT_ALLOW_HTTP=1"),
        ({"INTELLIWATT_BASE_URL": "ftp://app.example.com"}, "must start with https://"),
        ({"STATE_FILE": "{inbox}"}, "is a directory"),
    ],
)
def test_bad_secrets_urls_and_state_file_exit_2_before_any_traffic(
    env, sftp_peer, webapp, inbox, override: dict[str, str], says: str
) -> None:
    bad = {k: v.format(inbox=inbox) for k, v in override.items()}
    seen = sshd_connections(sftp_peer)
    proc = cli(["ingest"], {**env, **bad})
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    if "ADMIN_TOKEN" in bad:
        assert bad["ADMIN_TOKEN"] not in proc.stderr
    assert webapp.requests() == [] and sshd_connections(sftp_peer) == seen


def test_plain_http_is_accepted_for_loopback_and_by_explicit_opt_in(env, inbox) -> None:
    from smt_droplet.config import ConfigError, PostSettings

    assert PostSettings.from_env(env).base_url.startswith("http://127.0.0.1:")
    remote = {**env, "INTELLIWATT_BASE_URL": "http://app.example.com"}
    with pytest.raises(ConfigError):
        PostSettings.from_env(remote)
    assert PostSettings.from_env({**remote, "SMT_ALLOW_HTTP": "1"}).base_url == (
        "http://app.example.com"
    )


def test_unusable_key_exits_2_before_any_connection(
    env, sftp_peer, webapp, smt_csv, inbox, tmp_path: Path
) -> None:
    put_remote(sftp_peer, smt_csv, f"IntervalMeterUsage_{ESIID}_1.csv")
    smt_csv.write(inbox, name=f"local_{ESIID}.csv", esiid=ESIID)  # would be posted
    garbage = tmp_path / "id_garbage"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    seen = sshd_connections(sftp_peer)
    for key in (str(garbage), str(tmp_path)):  # garbage; a directory (not a readable file)
        proc = cli(["ingest"], {**env, "SMT_KEY": key})
        assert proc.returncode == 2, proc.stderr
        assert f"SMT_KEY={key}" in proc.stderr
    assert webapp.requests() == [] and sshd_connections(sftp_peer) == seen
    assert sorted(p.name for p in inbox.iterdir()) == [f"local_{ESIID}.csv"]


def test_wrong_admin_token_exits_2_from_the_cli_and_leaves_the_ledger(
    env, smt_csv, webapp, inbox
) -> None:
    smt_csv.write(inbox, name=f"a_{ESIID}.csv", esiid=ESIID)
    state = inbox / ".posted_sha256"
    state.write_text("0" * 64 + "\n")
    proc = cli(["ingest", "--no-sync"], {**env, "ADMIN_TOKEN": "wrong-token-value"})
    assert proc.returncode == 2, proc.stderr
    assert "401" in proc.stderr and "ADMIN_TOKEN" in proc.stderr
    assert "wrong-token-value" not in proc.stderr
    assert state.read_text() == "0" * 64 + "\n"
    assert webapp.received() == [] and len(webapp.requests()) == 1


# -- 2. dropped and stalled SFTP connections mid-download -----------------------------------


def big_remote(peer: SftpPeer, megabytes: int, name: str = f"IntervalMeterUsage_{ESIID}_big.csv"):
    """A large, very compressible SMT-like CSV on the peer; returns (name, sha256)."""
    line = f"'{ESIID},3/8/2025,3/10/2025 1:05,0:00,0:15,0.207,A,Consumption\n".encode()
    data = b"ESIID,USAGE_DATE\n" + line * (megabytes * 1_000_000 // len(line))
    path = peer.root / name
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return name, sha256(data)


def sftp_settings(env: dict[str, str], **overrides: object) -> SftpSettings:
    return replace(SftpSettings.from_env(env), parallel=1, **overrides)


def session_pids(peer: SftpPeer) -> list[int]:
    """The per-connection sshd processes (never the listener itself)."""
    assert peer.pid is not None
    return _descendants(peer.pid)


def partial_growing(inbox: Path, name: str, at_least: int = 1_000_000) -> bool:
    for path in inbox.glob(f".{name}.*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size >= at_least:
                return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return False


class Background:
    """Run ``mirror`` in a thread so the test can break the connection under it."""

    def __init__(self, settings: SftpSettings, sleeps: list[float]) -> None:
        self.result: MirrorResult | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0

        def run() -> None:
            try:
                self.result = mirror(settings, sleep=sleeps.append)
            except Exception as exc:  # noqa: BLE001 - re-raised by join()
                self.error = exc
            self.elapsed = time.monotonic() - self.started

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> MirrorResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"mirror still running after {timeout}s (hung)"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def test_connection_killed_mid_download_reconnects_with_backoff_and_completes(
    env, sftp_peer, smt_csv, inbox, caplog
) -> None:
    small = put_remote(sftp_peer, smt_csv, f"IntervalMeterUsage_{ESIID}_small.csv")
    name, digest = big_remote(sftp_peer, 60)
    settings = sftp_settings(env, retries=2, retry_base_delay=0.25, retry_max_delay=1.0)
    sleeps: list[float] = []
    caplog.set_level(logging.WARNING, logger="smt_droplet")
    job = Background(settings, sleeps)
    assert wait_for(lambda: partial_growing(inbox, name)), "no partial download to interrupt"
    assert not (inbox / name).exists()
    assert sftp_peer.kill_connections() > 0
    result = job.join(60)
    assert result.error is None, result.error
    assert sorted(f.rel for f in result.downloaded) == sorted(
        [name, f"IntervalMeterUsage_{ESIID}_small.csv"]
    )
    assert sleeps == [0.25]  # one reconnect, after the configured backoff
    assert sha256((inbox / name).read_bytes()) == digest
    assert sha256((inbox / f"IntervalMeterUsage_{ESIID}_small.csv").read_bytes()) == small
    assert leftovers(inbox) == []
    assert any("reconnecting" in r.getMessage() and name in r.getMessage() for r in caplog.records)


def test_connection_lost_for_good_reports_the_failure_and_the_next_pass_completes(
    env, sftp_peer, smt_csv, webapp, inbox
) -> None:
    name, digest = big_remote(sftp_peer, 60)
    env = {**env, "SMT_SFTP_RETRIES": "1", "SMT_RETRY_BASE_DELAY": "0.01", "SMT_SFTP_PARALLEL": "1"}
    settings = SftpSettings.from_env(env)
    stop = threading.Event()

    def keep_killing() -> None:  # every connection, including the reconnect, is dropped
        while not stop.is_set():
            if partial_growing(inbox, name, 1):
                sftp_peer.kill_connections()
            time.sleep(0.001)

    killer = threading.Thread(target=keep_killing, daemon=True)
    killer.start()
    try:
        result = Background(settings, []).join(60)
    finally:
        stop.set()
        killer.join()
    assert result.error is not None and name in result.error, result.error
    assert [f.status for f in result.files] == ["failed"]
    assert not (inbox / name).exists() and leftovers(inbox) == []
    assert webapp.requests() == []

    again = run_pass(env)
    assert again.exit_code == 0, again.summary_line()
    assert [f.rel for f in again.sync.downloaded] == [name]
    assert sha256((inbox / name).read_bytes()) == digest
    stored_once(webapp, {digest})


def test_stalled_connection_times_out_reconnects_and_completes(env, sftp_peer, inbox) -> None:
    name, digest = big_remote(sftp_peer, 60)
    settings = sftp_settings(env, retries=1, retry_base_delay=0.01, io_timeout=1.0)
    stopped: list[int] = []
    try:
        job = Background(settings, [])
        assert wait_for(lambda: partial_growing(inbox, name)), "no partial download to stall"
        stopped = session_pids(sftp_peer)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)  # the server goes silent; TCP stays up
        result = job.join(30)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
    assert result.error is None, result.error
    assert [f.rel for f in result.downloaded] == [name]
    assert sha256((inbox / name).read_bytes()) == digest
    assert leftovers(inbox) == []
    assert job.elapsed < 15, f"took {job.elapsed:.1f}s for a 1 s I/O timeout"


def test_upload_with_the_whole_disk_full_is_a_clear_5xx_and_stores_nothing(
    tmp_path: Path, tmpfs, servers
) -> None:
    """The usual droplet: inbox, spool and limiter database on one filesystem, and it is full."""
    disk = tmpfs(tmp_path / "disk", "1m")
    inbox, spool_dir = disk / "inbox", disk / "spool"
    inbox.mkdir()
    env = upload_env(disk, inbox, spool_dir, SMT_ADMIN_UPLOAD_DAILY_LIMIT="1")
    server = ServerProcess("upload-server", env, tmp_path / "upload.log").start()
    servers.append(server)
    filler = fill(disk)
    data = csv_bytes(3000)
    r = upload(server, data)
    # The limiter's database is the first write, before any body byte is stored.
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "limiter_unavailable"
    assert os.listdir(inbox) == [] and queued(spool_dir) == [] and leftovers(disk) == []
    log = server.wait_for_log("database or disk is full")
    assert "POST /upload 503" in log and UPLOAD_TOKEN not in log

    filler.unlink()
    r = upload(server, data)
    assert r.status_code == 202, r.text  # nothing of the failed attempt was counted
    assert (inbox / r.json()["filename"]).read_bytes() == data
    assert len(queued(spool_dir)) == 1


# -- secrets from systemd credentials ---------------------------------------------------------


def test_credentials_beat_the_env_file_and_stay_out_of_the_environment(tmp_path: Path) -> None:
    from smt_droplet.envfile import EnvFileError, load_environment

    env_file = tmp_path / "smt-webhook"
    env_file.write_text("INTELLIWATT_WEBHOOK_SECRET=from-the-env-file\nSMT_WEBHOOK_PORT=8787\n")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "INTELLIWATT_WEBHOOK_SECRET").write_text("from-the-credential\n")
    (creds / "SMT_WEBHOOK_PORT").write_text("9999")  # not a secret: never read from here
    base = {"CREDENTIALS_DIRECTORY": str(creds)}
    env = load_environment(env_file, base=base)
    assert env["INTELLIWATT_WEBHOOK_SECRET"] == "from-the-credential"
    assert env["SMT_WEBHOOK_PORT"] == "8787"
    # A box without credentials (the seed's env file with its secrets) works as before.
    assert load_environment(env_file, base={})["INTELLIWATT_WEBHOOK_SECRET"] == "from-the-env-file"
    (creds / "ADMIN_TOKEN").mkdir()  # unreadable as a file: a clear error, not a traceback
    with pytest.raises(EnvFileError, match="credential ADMIN_TOKEN"):
        load_environment(env_file, base=base)


def test_a_server_takes_its_secret_from_credentials(tmp_path: Path) -> None:
    """What systemd's LoadCredential= gives the webhook: the secret as a file, not in environ."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret = "credential-secret-0123456789abcdefghij"
    (creds / "INTELLIWATT_WEBHOOK_SECRET").write_text(secret + "\n")
    server = ServerProcess(
        "webhook-server",
        {
            "CREDENTIALS_DIRECTORY": str(creds),
            "SMT_SPOOL_DIR": str(tmp_path / "spool"),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": "0",
        },
        tmp_path / "cred.log",
    ).start()
    try:
        url = server.url("/trigger/smt-now")
        assert requests.post(url, headers={"x-smt-secret": secret}, timeout=5).status_code == 202
        assert requests.post(url, headers={"x-smt-secret": "x" * 38}, timeout=5).status_code == 401
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes()
        assert secret.encode() not in environ
    finally:
        server.ensure_stopped()
