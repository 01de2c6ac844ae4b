#!/usr/bin/env python3
"""Side-by-side benchmarks of the droplet against what users would run instead (issue 6).

Run through ``bench/run`` (which installs the peers first). Every figure is a ratio against a
baseline measured in the same run, on the same loopback peers:

1. SFTP mirror, one 200 MB file: ``smt-droplet sync`` vs OpenSSH ``sftp`` vs ``rclone copy``.
2. SFTP mirror, 2,000 files of 30 KB: the same three.
3. Idle pass over 10,000 mirrored and posted files: ``smt-droplet ingest`` vs the old droplet's
   pass (``bench/legacy_idle_pass.sh``: ``sftp mget -p -r`` + ``sha256sum`` + ``grep``).
4. Posting the 12-month SMT file: body size (gzip+base64 vs base64) vs the 4.5 MB cap, time to
   post (``smt-droplet post`` vs ``bench/legacy_post.sh``: base64 | jq | curl), peak RSS of a
   whole ingest pass vs the bare interpreter with the same imports.
5. Upload server: 25 MB ``curl -F`` upload, ours vs nginx (``client_body_in_file_only``), plain
   and through the TLS front (Caddy with the role's Caddyfile vs nginx with TLS, one
   certificate); peak RSS of the server and of Caddy after 1 MB uploads vs after 25 MB uploads.
6. Webhook: ``wrk`` 32 connections 10 s, authorized and unauthorized, ours vs adnanh/webhook.
7. Provisioning (``--provisioning``): ``site.yml`` on the full-stack droplet container over SSH
   (first converge, no-op re-converge) beside a no-op over ``podman exec``; then webhook
   trigger → systemd starting the pass, 20 times (``testbed/trigger_latency.py``).
8. Posting inside one pass: 200 x 30 KB from the inbox vs a shell loop of curl per file.
9. Delivery by raw-upload (the app's large-file path) beside inline, one pass.
10. SFTP over a long link: ``testbed/delay_link.py`` delays every byte 0, 20 and 50 ms each way;
    a 50 MB file, the 12-month CSV and 300 x 30 KB (100 at 50 ms, where sftp's one file at a
    time takes a minute), ours vs ``sftp`` vs ``rclone copy``.

Results go to ``bench/results.json`` (merged per item, so ``--only`` refreshes a part) and the
table between the markers in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.intelliwatt_double import IntelliWattDouble  # noqa: E402
from testbed.sftp_peer import SftpPeer  # noqa: E402
from testbed.smt_csv import HEADER, generate_interval_csv, shared_fixture  # noqa: E402

BENCH = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
CLI = VENV_BIN / "smt-droplet"
RESULTS = BENCH / "results.json"
README = BENCH / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FIXTURE = shared_fixture("smt/IntervalMeterUsage_10443720000000099_20251101.csv")
ESIID = "10443720000000099"
MB = 1_000_000
TOKEN = "b" * 64
SECRET = "s3cret-" + "w" * 32
ITEMS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")


class BenchError(RuntimeError):
    """A benchmark could not run or produced a wrong result; the message says which."""


@dataclass
class Row:
    """One line of the results table."""

    item: str
    metric: str
    ours: str
    baseline: str
    ratio: str
    target: str
    met: str  # "yes" | "no" | "n/a"
    note: str = ""


@dataclass
class ItemResult:
    """Everything one benchmark item produced."""

    item: str
    title: str
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""
    error: str | None = None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def yes_no(ok: bool) -> str:
    return "yes" if ok else "no"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path


def dir_stats(path: Path) -> tuple[int, int]:
    """(number of regular non-dot files, total bytes) directly under ``path``."""
    count = total = 0
    for entry in os.scandir(path):
        if entry.is_file() and not entry.name.startswith("."):
            count += 1
            total += entry.stat().st_size
    return count, total


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = str(exc)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{url} not answering after {timeout:.0f}s ({last})")


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# -- test data ------------------------------------------------------------------------------


class Data:
    """Synthetic SMT CSV rows in the real export layout (testbed/smt_csv.py), generated once."""

    def __init__(self) -> None:
        year = generate_interval_csv(ESIID, date(2024, 11, 1), 365, seed=6)
        self.year = year
        self.rows = year.split(b"\n")[1:-1]
        self.header = HEADER.encode() + b"\n"

    def tiled(self, size: int) -> bytes:
        """``size`` bytes (cut at a line end) of header + the year's rows repeated."""
        body = self.year[len(self.header) :]
        reps = size // len(body) + 1
        data = self.header + body * reps
        cut = data.rfind(b"\n", 0, size) + 1
        return data[:cut]

    def slice(self, start: int, size: int) -> bytes:
        """Header + consecutive rows from ``start`` until the file reaches ``size`` bytes."""
        parts = [self.header]
        total = len(self.header)
        i = start % len(self.rows)
        while total < size:
            line = self.rows[i] + b"\n"
            parts.append(line)
            total += len(line)
            i = (i + 1) % len(self.rows)
        return b"".join(parts)

    def post_file(self) -> bytes:
        """The 12-month file: the shared fixture when present, else a generated one."""
        if FIXTURE is not None:
            return FIXTURE.read_bytes()
        return self.year


def write_many(directory: Path, count: int, sizes: tuple[int, int], seed: int) -> int:
    """``count`` distinct SMT CSVs of ``sizes`` bytes (uniform); returns the total bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    data = DATA
    rng = random.Random(seed)
    total = 0
    stamp = time.time() - 3600
    for i in range(count):
        size = rng.randint(*sizes)
        content = data.slice(i * 3 + seed, size)
        path = directory / f"IntervalMeterUsage_{ESIID}_{i:05d}.csv"
        path.write_bytes(content)
        os.utime(path, (stamp, stamp))
        total += len(content)
    return total


DATA: Data


# -- the runner -------------------------------------------------------------------------------


@dataclass
class Link:
    """A delayed path to the SFTP peer (``Runner.delay_link``)."""

    proc: subprocess.Popen[str]
    port: int
    known_hosts: Path
    delay_ms: int


class Runner:
    """Owns the work directory, the peers and every process it starts (stopped by PID)."""

    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.procs: list[subprocess.Popen[Any]] = []
        self.peer: SftpPeer | None = None
        self.double: IntelliWattDouble | None = None
        self.current: ItemResult | None = None
        self.env = dict(os.environ)
        self.env["PATH"] = f"{VENV_BIN}:{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    # -- processes ----------------------------------------------------------------------------

    def show(self, text: str) -> str:
        text = text.replace(str(self.work), "$W").replace(str(REPO) + "/", "")
        return text.replace(TOKEN, "$TOKEN").replace(SECRET, "$SECRET")

    def note_command(self, argv: list[str] | str) -> None:
        text = argv if isinstance(argv, str) else shlex.join(argv)
        if self.current is not None:
            self.current.commands.append(self.show(text))

    def spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> Any:
        extra = {k: v for k, v in (env or {}).items() if self.env.get(k) != v}
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(extra.items()))
        self.note_command(f"{shown} {shlex.join(argv)}".strip())
        log = open(self.work / log_name, "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env or self.env,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        if self.peer is not None:
            self.peer.stop()
        if self.double is not None:
            self.double.stop()

    def run(self, argv: list[str] | str, env: dict[str, str] | None = None, **kw: Any) -> Any:
        self.note_command(argv)
        return subprocess.run(
            argv, env=env or self.env, shell=isinstance(argv, str), check=False, **kw
        )

    # -- measuring tools ----------------------------------------------------------------------

    def hyperfine(
        self,
        label: str,
        commands: dict[str, str],
        runs: int,
        warmup: int = 0,
        prepare: str | dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Mean/stddev/min seconds per named command (hyperfine --export-json).

        ``prepare``: one command before every run, or one per command name."""
        out = self.work / f"hyperfine-{label}.json"
        argv = ["hyperfine", "--style", "basic", "--runs", str(runs), "--warmup", str(warmup)]
        argv += ["--export-json", str(out)]
        if isinstance(prepare, dict):
            for name in commands:
                argv += ["--prepare", prepare[name]]
        elif prepare:
            argv += ["--prepare", prepare]
        for name, command in commands.items():
            argv += ["--command-name", name, command]
        self.note_command(argv)
        done = subprocess.run(argv, env=env or self.env, check=False)
        if done.returncode != 0:
            raise BenchError(f"hyperfine {label} failed (exit {done.returncode}); see above")
        data = json.loads(out.read_text())
        results = {}
        for r in data["results"]:
            results[r["command"]] = {
                "mean": r["mean"],
                "stddev": r.get("stddev") or 0.0,
                "min": r["min"],
                "max": r["max"],
                "runs": len(r["times"]),
            }
        return results

    def time_v(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
        """(wall seconds, peak RSS kB, stderr) of one command under GNU ``/usr/bin/time -v``."""
        full = ["/usr/bin/time", "-v", *argv]
        self.note_command(full)
        began = time.monotonic()
        done = subprocess.run(
            full, env=env or self.env, capture_output=True, text=True, check=False
        )
        wall = time.monotonic() - began
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        if done.returncode != 0 or match is None:
            own = done.stderr.split("\tCommand being timed:")[0]
            raise BenchError(f"{shlex.join(argv)} exited {done.returncode}: {own[-800:]}")
        return wall, int(match.group(1)), done.stderr

    # -- shared peers -------------------------------------------------------------------------

    def sftp_peer(self) -> SftpPeer:
        if self.peer is None:
            self.peer = SftpPeer(self.work / "sshd").start()
        return self.peer

    def web_double(self) -> IntelliWattDouble:
        if self.double is None:
            self.double = IntelliWattDouble(admin_token=TOKEN, keep_content=False).start()
        return self.double

    def ssh_opts(self, link: Link | None = None) -> str:
        peer = self.sftp_peer()
        port, known = (link.port, link.known_hosts) if link else (peer.port, peer.known_hosts)
        return (
            f"-i {peer.user_key} -P {port} -o BatchMode=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={known} {peer.user}@{peer.host}"
        )

    def rclone_flags(self, link: Link | None = None) -> str:
        peer = self.sftp_peer()
        port, known = (link.port, link.known_hosts) if link else (peer.port, peer.known_hosts)
        conf = self.work / "rclone.conf"
        conf.touch()
        return (
            f"--config {conf} --sftp-host {peer.host} --sftp-port {port} "
            f"--sftp-user {peer.user} --sftp-key-file {peer.user_key} "
            f"--sftp-known-hosts-file {known} --sftp-shell-type none "
            "--sftp-disable-hashcheck"
        )

    def delay_link(self, delay_ms: int) -> Link:
        """The SFTP peer behind ``testbed/delay_link.py`` (``delay_ms`` each way), with the
        peer's host key pinned for the relay's port."""
        peer = self.sftp_peer()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "testbed" / "delay_link.py"),
                "--to",
                f"{peer.host}:{peer.port}",
                "--delay-ms",
                str(delay_ms),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise BenchError(f"delay link did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        key = peer.known_hosts.read_text().split(None, 1)[1]
        known = self.work / f"known_hosts-{port}"
        known.write_text(f"[{peer.host}]:{port} {key}")
        self.note_command(
            f"python3 testbed/delay_link.py --to {peer.host}:{peer.port} --delay-ms {delay_ms}"
        )
        return Link(proc=proc, port=port, known_hosts=known, delay_ms=delay_ms)

    def ingest_env(self, name: str, remote: Path, local: Path, **extra: str) -> Path:
        peer = self.sftp_peer()
        values = peer.env()
        values.update(
            {
                "SMT_REMOTE_DIR": str(remote),
                "SMT_LOCAL_DIR": str(local),
                "SMT_SPOOL_DIR": str(self.work / f"spool-{name}"),
                "INTELLIWATT_BASE_URL": self.web_double().url,
                "ADMIN_TOKEN": TOKEN,
                "SMT_SFTP_RETRIES": "0",
            }
        )
        values.update(extra)
        path = write_env(self.work / f"{name}.env", values)
        self.note_command(f"# {path}: " + " ".join(f"{k}={v}" for k, v in values.items()))
        return path


# -- 1 + 2: SFTP mirror ---------------------------------------------------------------------


def bench_sftp(r: Runner, res: ItemResult, label: str, files: int, size: int) -> None:
    peer = r.sftp_peer()
    remote = peer.root / label
    remote.mkdir(parents=True, exist_ok=True)
    if files == 1:
        path = remote / f"IntervalMeterUsage_{ESIID}_big.csv"
        data = DATA.tiled(size)
        path.write_bytes(data)
        total = len(data)
        get = f"get {path}"
    else:
        total = write_many(remote, files, (size, size), seed=2)
        get = f"mget {remote}/*"
    tools = ("ours", "sftp", "rclone") + (("paramiko",) if files == 1 else ())
    dst = {name: r.work / f"{label}-{name}" for name in tools}
    batch = r.work / f"{label}.sftp"
    batch.write_text(f"lcd {dst['sftp']}\n{get}\n")
    env_file = r.ingest_env(label, remote, dst["ours"])
    runs = 2 if r.quick else 3
    commands = {
        "smt-droplet sync": f"{CLI} sync --env-file {env_file}",
        "OpenSSH sftp": f"sftp -q -b {batch} {r.ssh_opts()} >/dev/null",
        "rclone copy": f"rclone copy {r.rclone_flags()} :sftp:{remote} {dst['rclone']}",
    }
    if files == 1:  # the same library with its own defaults: what our code adds on top of it
        peer = r.sftp_peer()
        commands["paramiko get"] = (
            f"{VENV_BIN / 'python'} {BENCH / 'paramiko_get.py'} {peer.host} {peer.port} "
            f"{peer.user} {peer.user_key} {peer.known_hosts} {path} "
            f"{dst['paramiko'] / path.name}"
        )
    tool_dir = dict(zip(commands, dst.values(), strict=True))
    # sync: no run starts with another run's writeback pending (a tool that flushes, as ours
    # does before its renames, would otherwise pay for the previous tool's unflushed files)
    prepare = {name: f"rm -rf {d} && mkdir -p {d} && sync" for name, d in tool_dir.items()}
    stats = r.hyperfine(label, commands, runs=runs, warmup=0 if files == 1 else 1, prepare=prepare)
    for name, directory in dst.items():
        got = dir_stats(directory)
        if got != (files, total):
            raise BenchError(
                f"{label}: {name} left {got} (files, bytes), expected {(files, total)}"
            )
    t_ours = stats["smt-droplet sync"]["mean"]
    t_sftp = stats["OpenSSH sftp"]["mean"]
    t_rclone = stats["rclone copy"]["mean"]
    res.raw = {"bytes": total, "files": files, "hyperfine": stats}
    mbps = {k: total / MB / v["mean"] for k, v in stats.items()}
    if files == 1:
        ratio = t_sftp / t_ours
        res.rows.append(
            Row(
                item=res.item,
                metric=f"throughput, 1 x {total / MB:.0f} MB (mean of {runs})",
                ours=f"{mbps['smt-droplet sync']:.0f} MB/s ({t_ours:.2f} s)",
                baseline=f"sftp {mbps['OpenSSH sftp']:.0f} MB/s ({t_sftp:.2f} s); "
                f"rclone {mbps['rclone copy']:.0f} MB/s ({t_rclone:.2f} s); "
                f"paramiko get {mbps['paramiko get']:.0f} MB/s "
                f"({stats['paramiko get']['mean']:.2f} s)",
                ratio=f"{ratio:.2f}x sftp; {t_rclone / t_ours:.2f}x rclone; "
                f"{stats['paramiko get']['mean'] / t_ours:.2f}x paramiko get",
                target="≥ 0.9x sftp, ≥ 1.0x rclone",
                met=yes_no(ratio >= 0.9 and t_rclone >= t_ours),
            )
        )
    else:
        ratio = t_sftp / t_ours
        res.rows.append(
            Row(
                item=res.item,
                metric=f"wall time, {files} x {size / 1000:.0f} KB (mean of {runs})",
                ours=f"{t_ours:.2f} s ({files / t_ours:.0f} files/s)",
                baseline=f"sftp mget {t_sftp:.2f} s; rclone {t_rclone:.2f} s",
                ratio=f"{ratio:.2f}x sftp; {t_rclone / t_ours:.2f}x rclone",
                target="≥ 1.5x sftp mget, ≥ 1.2x rclone",
                met=yes_no(ratio >= 1.5 and t_rclone / t_ours >= 1.2),
            )
        )
    for directory in dst.values():
        shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(remote, ignore_errors=True)


# -- 3: the idle pass -------------------------------------------------------------------------


def bench_idle(r: Runner, res: ItemResult) -> None:
    peer = r.sftp_peer()
    double = r.web_double()
    count = 500 if r.quick else 10_000
    remote = peer.root / "idle"
    total = write_many(remote, count, (30_000, 260_000), seed=3)
    local = r.work / "idle-inbox"
    env_file = r.ingest_env("idle", remote, local)
    began = time.monotonic()
    first = r.run([str(CLI), "sync", "--env-file", str(env_file)], capture_output=True)
    first_sync = time.monotonic() - began
    if first.returncode != 0 or dir_stats(local) != (count, total):
        raise BenchError(f"idle: first sync failed: {first.stderr.decode()[-800:]}")
    # "already posted": the legacy ledger format, one sha256 per line (docs/design.md)
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in local.glob("*.csv"))
    ledger = "".join(d + "\n" for d in digests)
    (local / ".posted_sha256").write_text(ledger)
    legacy_dir = r.work / "idle-legacy"
    legacy_dir.mkdir()
    legacy_state = r.work / "idle-legacy.posted_sha256"
    legacy_state.write_text(ledger)
    before = len(double.requests())
    legacy_env = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in {
            **peer.env(),
            "SMT_REMOTE_DIR": str(remote),
            "SMT_LOCAL_DIR": str(legacy_dir),
            "STATE_FILE": str(legacy_state),
        }.items()
    )
    ours_runs = 2 if r.quick else 5
    legacy_runs = 2
    # the first pass (warm-up) hashes every file once into the hash cache, as on a real box
    stats_ours = r.hyperfine(
        "idle-ours",
        {"smt-droplet ingest": f"{CLI} ingest --env-file {env_file}"},
        runs=ours_runs,
        warmup=1,
    )
    stats_legacy = r.hyperfine(
        "idle-legacy",
        {"legacy pass": f"env {legacy_env} sh {BENCH / 'legacy_idle_pass.sh'} >/dev/null"},
        runs=legacy_runs,
    )
    if len(double.requests()) != before:
        raise BenchError("idle: our pass posted something; the inbox was supposed to be idle")
    _, rss_ours, last = r.time_v([str(CLI), "ingest", "--env-file", str(env_file)])
    summary = [ln for ln in last.splitlines() if " summary " in ln]
    t_ours = stats_ours["smt-droplet ingest"]["mean"]
    t_legacy = stats_legacy["legacy pass"]["mean"]
    ratio = t_legacy / t_ours
    res.raw = {
        "files": count,
        "bytes": total,
        "first_sync_s": first_sync,
        "hyperfine": {**stats_ours, **stats_legacy},
        "peak_rss_kb": rss_ours,
        "summary": summary[-1] if summary else "",
    }
    res.rows.append(
        Row(
            item=res.item,
            metric=f"idle pass, {count} files ({total / MB:.0f} MB) mirrored + posted",
            ours=f"{t_ours:.2f} s (± {stats_ours['smt-droplet ingest']['stddev']:.2f}, "
            f"{ours_runs} runs), peak RSS {rss_ours / 1024:.0f} MB",
            baseline=f"sftp mget -p -r + sha256sum + grep: {t_legacy:.1f} s ({legacy_runs} runs)",
            ratio=f"{ratio:.0f}x faster",
            target="≥ 100x the old way",
            met=yes_no(ratio >= 100),
            note=f"first mirror of the {count} mixed-size files by `smt-droplet sync`: "
            f"{first_sync:.1f} s",
        )
    )
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    shutil.rmtree(legacy_dir, ignore_errors=True)
    growth = _idle_growth(r, res, t_legacy / count, count)
    res.raw["growth"] = growth


def _idle_after_own_posts(
    r: Runner, res: ItemResult, remote: Path, n: int, legacy_point: dict[str, Any]
) -> dict[str, Any]:
    """The same N files, but posted by our own pass (so the ledger's post log holds each post's
    record: the app's id, ESIID, the CSV summary), then an idle pass: the steady state of a
    droplet after years, where the growth curve's inboxes (a legacy ledger of digests only)
    are the state right after a takeover."""
    local = r.work / f"own-{n}-inbox"
    if r.run(["cp", "-a", str(remote), str(local)]).returncode != 0:
        raise BenchError(f"own posts: cannot copy {remote} to {local}")
    env_file = r.ingest_env(f"own-{n}", remote, local)
    posted = r.run(
        [str(CLI), "ingest", "--no-sync", "--env-file", str(env_file)], capture_output=True
    )
    if posted.returncode != 0 or f"posted={n} " not in posted.stderr.decode():
        raise BenchError(f"own posts: the posting pass failed: {posted.stderr.decode()[-800:]}")
    command = f"{CLI} ingest --env-file {env_file}"
    stats = r.hyperfine(f"own-{n}", {"idle pass": command}, runs=3, warmup=1)["idle pass"]
    _, rss, _ = r.time_v(shlex.split(command))
    sidecar, log = local / ".posted_sha256.json", local / ".posted_sha256.posts.jsonl"
    point = {
        "mean_s": stats["mean"],
        "stddev_s": stats["stddev"],
        "rss_kb": rss,
        "sidecar_bytes": sidecar.stat().st_size if sidecar.is_file() else 0,
        "post_log_bytes": log.stat().st_size if log.is_file() else 0,
    }
    res.rows.append(
        Row(
            item=res.item,
            metric=f"idle pass, {n} files of 2-8 KB posted by our own pass (mean of 3)",
            ours=f"{point['mean_s']:.2f} s (± {point['stddev_s']:.2f}), "
            f"peak RSS {rss / 1024:.0f} MB (sidecar {point['sidecar_bytes'] / MB:.1f} MB, "
            f"post log {point['post_log_bytes'] / MB:.1f} MB, not read by a pass)",
            baseline=f"the same files under a legacy ledger only: {legacy_point['mean_s']:.2f} s, "
            f"{legacy_point['rss_kb'] / 1024:.0f} MB",
            ratio=f"{rss / legacy_point['rss_kb']:.2f}x the peak RSS",
            target="—",
            met="n/a",
        )
    )
    shutil.rmtree(local, ignore_errors=True)
    return point


def _idle_growth(
    r: Runner, res: ItemResult, seconds_per_file_legacy: float, legacy_files: int
) -> dict[str, Any]:
    """How the idle pass grows with the inbox: N small files already posted (the remote tree
    from ``write_many``, the inbox a ``cp -a`` of it, the legacy ledger of their digests, one
    warm-up pass that fills the hash cache), then the time and peak RSS of an idle pass at each
    N and the slope between the smallest and the largest. The first N also measures the first
    mirror of the tree against ``rclone copy``. The old way is not run at these sizes (tens of
    minutes at 100k): its time is extrapolated from the run above, linear in the files."""
    peer = r.sftp_peer()
    sizes = (500, 1000, 2000) if r.quick else (10_000, 50_000, 100_000)
    points: dict[str, Any] = {}
    for n in sizes:
        remote = peer.root / f"grow-{n}"
        total = write_many(remote, n, (2_000, 8_000), seed=11)
        local = r.work / f"grow-{n}-inbox"
        if n == sizes[0]:
            _first_mirror(r, res, remote, n, total)
        if r.run(["cp", "-a", str(remote), str(local)]).returncode != 0:
            raise BenchError(f"growth: cannot copy {remote} to {local}")
        digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in local.glob("*.csv"))
        (local / ".posted_sha256").write_text("".join(d + "\n" for d in digests))
        env_file = r.ingest_env(f"grow-{n}", remote, local)
        command = f"{CLI} ingest --env-file {env_file}"
        stats = r.hyperfine(f"grow-{n}", {"idle pass": command}, runs=3, warmup=1)["idle pass"]
        _, rss, _ = r.time_v(shlex.split(command))
        points[str(n)] = {"mean_s": stats["mean"], "stddev_s": stats["stddev"], "rss_kb": rss}
        shutil.rmtree(local, ignore_errors=True)
        if n == sizes[0]:
            points["own-posts"] = _idle_after_own_posts(r, res, remote, n, points[str(n)])
        shutil.rmtree(remote, ignore_errors=True)
    first, last = points[str(sizes[0])], points[str(sizes[-1])]
    per_10k = 10_000 / (sizes[-1] - sizes[0])
    slope_s = (last["mean_s"] - first["mean_s"]) * per_10k
    slope_mb = (last["rss_kb"] - first["rss_kb"]) / 1024 * per_10k
    top = sizes[-1]
    for n in sizes:
        p = points[str(n)]
        legacy = seconds_per_file_legacy * n
        res.rows.append(
            Row(
                item=res.item,
                metric=f"idle pass, {n} files of 2-8 KB already posted (mean of 3)",
                ours=f"{p['mean_s']:.2f} s (± {p['stddev_s']:.2f}), "
                f"peak RSS {p['rss_kb'] / 1024:.0f} MB",
                baseline=f"old way ~{legacy:.0f} s (linear from its {legacy_files}-file run "
                "of mixed sizes)",
                ratio=f"~{legacy / p['mean_s']:.0f}x faster",
                target="≤ 3 s and ≤ 80 MB" if n == top else "—",
                met=yes_no(p["mean_s"] <= 3.0 and p["rss_kb"] <= 80 * 1024) if n == top else "n/a",
            )
        )
    res.rows.append(
        Row(
            item=res.item,
            metric=f"slope of the idle pass, {sizes[0]} → {top} files",
            ours=f"+{slope_s:.2f} s and +{slope_mb:.1f} MB peak RSS per 10,000 files",
            baseline="—",
            ratio="—",
            target="reported",
            met="yes",
        )
    )
    return {"points": points, "slope_s_per_10k": slope_s, "slope_mb_per_10k": slope_mb}


def _first_mirror(r: Runner, res: ItemResult, remote: Path, n: int, total: int) -> None:
    """The first mirror of ``n`` small files into an empty inbox, ours against rclone copy."""
    dst = {"ours": r.work / "first-ours", "rclone": r.work / "first-rclone"}
    env_file = r.ingest_env("first", remote, dst["ours"])
    commands = {
        "smt-droplet sync": f"{CLI} sync --env-file {env_file}",
        "rclone copy": f"rclone copy {r.rclone_flags()} :sftp:{remote} {dst['rclone']}",
    }
    prepare = {
        name: f"rm -rf {d} {r.work / 'spool-first'} && mkdir -p {d} && sync"
        for name, d in zip(commands, dst.values(), strict=True)
    }
    runs = 2 if r.quick else 3
    stats = r.hyperfine("first-mirror", commands, runs=runs, prepare=prepare)
    for name, directory in dst.items():
        if dir_stats(directory) != (n, total):
            raise BenchError(f"first mirror: {name} left {dir_stats(directory)}, not {(n, total)}")
        shutil.rmtree(directory, ignore_errors=True)
    t_ours = stats["smt-droplet sync"]["mean"]
    t_rclone = stats["rclone copy"]["mean"]
    res.rows.append(
        Row(
            item=res.item,
            metric=f"first mirror of {n} files of 2-8 KB into an empty inbox (mean of {runs})",
            ours=f"{t_ours:.2f} s ({n / t_ours:.0f} files/s)",
            baseline=f"rclone copy {t_rclone:.2f} s",
            ratio=f"{t_rclone / t_ours:.2f}x rclone",
            target="≥ 1.0x rclone copy",
            met=yes_no(t_rclone >= t_ours),
        )
    )


# -- 4: posting the 12-month file -------------------------------------------------------------


def bench_post(r: Runner, res: ItemResult) -> None:
    peer = r.sftp_peer()
    double = r.web_double()
    data = DATA.post_file()
    inbox = r.work / "post-inbox"
    inbox.mkdir()
    path = inbox / f"IntervalMeterUsage_{ESIID}_20251101.csv"
    path.write_bytes(data)
    bodies: dict[str, int] = {}
    env_files: dict[str, Path] = {}
    for encoding in ("base64+gzip", "base64"):
        tag = encoding.replace("+", "-")
        env_files[encoding] = r.ingest_env(
            f"post-{tag}",
            peer.root,
            inbox,
            SMT_ENCODING=encoding,
            STATE_FILE=str(r.work / f"post-{tag}.posted_sha256"),
        )
        done = r.run(
            [str(CLI), "post", "--force", "--env-file", str(env_files[encoding]), str(path)],
            capture_output=True,
            text=True,
        )
        last = double.requests()[-1] if double.requests() else {}
        if done.returncode != 0 or last.get("status") != 200:
            raise BenchError(f"post ({encoding}) failed: {done.stderr[-800:]}")
        bodies[encoding] = int(last["body_bytes"])
    legacy_env = dict(r.env, INTELLIWATT_BASE_URL=double.url, ADMIN_TOKEN=TOKEN)
    r.run(["sh", str(BENCH / "legacy_post.sh"), str(path), ESIID], env=legacy_env)
    legacy_body = int(double.requests()[-1]["body_bytes"])
    runs = 10
    stats = r.hyperfine(
        "post",
        {
            "smt-droplet post (gzip+base64)": f"{CLI} post --force --env-file "
            f"{env_files['base64+gzip']} {path}",
            "base64 | jq | curl": f"sh {BENCH / 'legacy_post.sh'} {path} {ESIID}",
            "python start-up (smt-droplet --version)": f"{CLI} --version",
        },
        runs=runs,
        warmup=1,
        env=legacy_env,
    )
    # peak RSS of a whole pass: sync + post of the 12-month file and 30 small files
    remote = peer.root / "pass"
    remote.mkdir()
    (remote / path.name).write_bytes(data)
    write_many(remote, 30, (30_000, 30_000), seed=4)
    pass_inbox = r.work / "pass-inbox"
    pass_inbox.mkdir()
    env_pass = r.ingest_env("pass", remote, pass_inbox)
    received = len(double.received())
    wall, rss_pass, _ = r.time_v([str(CLI), "ingest", "--env-file", str(env_pass)])
    posted = len(double.received()) - received
    if posted != 31:
        raise BenchError(f"ingest pass posted {posted} files, expected 31")
    python = str(VENV_BIN / "python")
    _, rss_floor, _ = r.time_v([python, "-c", "import paramiko, requests, smt_droplet.ingest"])
    raw = len(data)
    t_ours = stats["smt-droplet post (gzip+base64)"]["mean"]
    t_legacy = stats["base64 | jq | curl"]["mean"]
    t_start = stats["python start-up (smt-droplet --version)"]["mean"]
    cap = 4_500_000
    res.raw = {
        "raw_bytes": raw,
        "bodies": bodies,
        "legacy_body": legacy_body,
        "hyperfine": stats,
        "pass_wall_s": wall,
        "pass_peak_rss_kb": rss_pass,
        "floor_rss_kb": rss_floor,
    }
    gz = bodies["base64+gzip"]
    res.rows += [
        Row(
            item=res.item,
            metric=f"request body for the {raw / MB:.2f} MB 12-month file",
            ours=f"gzip+base64: {gz / MB:.2f} MB = {gz / raw:.0%} of raw",
            baseline=f"base64: {bodies['base64'] / MB:.2f} MB = {bodies['base64'] / raw:.0%} "
            f"of raw; cap {cap / MB:.1f} MB",
            ratio=f"{gz / bodies['base64']:.2f}x the base64 body; {gz / cap:.0%} of the cap",
            target="≤ 25% of raw",
            met=yes_no(gz <= raw * 0.25),
        ),
        Row(
            item=res.item,
            metric=f"time to post it to the local double (mean of {runs})",
            ours=f"{t_ours:.3f} s",
            baseline=f"base64 | jq | curl: {t_legacy:.3f} s",
            ratio=f"{t_legacy / t_ours:.2f}x (>1 = ours faster)",
            target="—",
            met="n/a",
            note=f"`smt-droplet post` is one process per file: {t_start:.3f} s of its "
            f"{t_ours:.3f} s is the interpreter starting (`smt-droplet --version`, same run); "
            "in a pass that cost is paid once, not per file",
        ),
        Row(
            item=res.item,
            metric="peak RSS of a whole ingest pass (sync + post 12-month file + 30 small files)",
            ours=f"{rss_pass / 1024:.1f} MB ({wall:.2f} s)",
            baseline=f"python3 importing paramiko+requests+the package: {rss_floor / 1024:.1f} MB",
            ratio=f"{rss_pass / rss_floor:.2f}x the import floor",
            target="≤ 60 MB",
            met=yes_no(rss_pass <= 60 * 1024),
        ),
    ]
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(pass_inbox, ignore_errors=True)
    shutil.rmtree(inbox, ignore_errors=True)


# -- 5: upload server -------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /upload {{
            client_max_body_size 30m;
            client_body_in_file_only on;
            proxy_pass http://127.0.0.1:{port2}/stored;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Body-File $request_body_file;
        }}
    }}
    server {{
        listen 127.0.0.1:{port_tls} ssl;
        server_name localhost;
        ssl_certificate {w}/tls.crt;
        ssl_certificate_key {w}/tls.key;
        location = /upload {{
            client_max_body_size 30m;
            client_body_in_file_only on;
            proxy_pass http://127.0.0.1:{port2}/stored;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Body-File $request_body_file;
        }}
    }}
    server {{
        listen 127.0.0.1:{port2};
        location = /stored {{ return 200 "stored\\n"; }}
    }}
}}
"""

CADDY = REPO / ".cache" / "tools" / "usr" / "bin" / "caddy"  # scripts/setup unpacks Debian's


def make_tls_cert(r: Runner, directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed ECDSA P-256 certificate for localhost (nginx and Caddy share it,
    so both sides do the same TLS work)."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    made = r.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-days", "2", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        raise BenchError(f"openssl req failed: {made.stderr.decode()[-300:]}")
    return cert, key


def start_caddy_front(r: Runner, directory: Path, upload_port: int) -> tuple[Any, int]:
    """Caddy with the role's own Caddyfile (roles/smt_tls, mode ``files``), rendered by
    Ansible's template module, in front of the upload server on ``upload_port``."""
    if not CADDY.is_file():
        raise BenchError(f"no caddy at {CADDY} (scripts/setup unpacks it)")
    port = free_port()
    variables = {
        "smt_tls_mode": "files",
        "smt_tls_cert_file": str(directory / "tls.crt"),
        "smt_tls_key_file": str(directory / "tls.key"),
        "smt_tls_domain": "localhost",
        "smt_tls_port": port,
        "smt_tls_upload_port": upload_port,
        "smt_tls_webhook_port": free_port(),
        "smt_tls_hsts_max_age": 31536000,
        "smt_tls_read_header_timeout": "10s",
        "smt_tls_read_body_timeout": "10m",
        "smt_tls_idle_timeout": "2m",
        # the upload server's default cap (25 MiB) plus multipart framing, as the role derives it
        "smt_tls_upload_max_body": 26 * 1024 * 1024,
    }
    (directory / "caddy-vars.json").write_text(json.dumps(variables))
    caddyfile = directory / "Caddyfile"
    template = REPO / "roles" / "smt_tls" / "templates" / "etc" / "caddy" / "Caddyfile.j2"
    rendered = r.run(
        [str(VENV_BIN / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
         "-a", f"src={template} dest={caddyfile} mode=0600",
         "-e", f"@{directory / 'caddy-vars.json'}"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if rendered.returncode != 0:
        raise BenchError(f"rendering the role's Caddyfile failed: {rendered.stdout[-800:]}")
    home = directory / "caddy-home"
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "PATH": "/usr/bin:/bin",
    }
    caddy = r.spawn(
        [str(CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        "caddy.log",
        env=env,
    )
    deadline = time.monotonic() + 20
    probe = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
             str(directory / "tls.crt"), f"https://localhost:{port}/health"]  # fmt: skip
    while subprocess.run(probe, capture_output=True, text=True, check=False).stdout != "200":
        if caddy.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"caddy did not serve TLS on {port}: see $W/caddy.log")
        time.sleep(0.1)
    return caddy, port


def start_upload_server(r: Runner, name: str) -> tuple[Any, str, Path]:
    port = free_port()
    inbox = r.work / f"{name}-inbox"
    inbox.mkdir()
    env = dict(r.env)
    env.update(
        {
            "SMT_LOCAL_DIR": str(inbox),
            "SMT_SPOOL_DIR": str(r.work / f"{name}-spool"),
            "SMT_UPLOAD_STATE": str(r.work / f"{name}-ratelimit.sqlite3"),
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": str(port),
            "SMT_UPLOAD_TOKEN": TOKEN,
            "SMT_ADMIN_UPLOAD_DAILY_LIMIT": "1000000",
        }
    )
    proc = r.spawn([str(CLI), "upload-server"], f"{name}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc, url, inbox


def bench_upload(r: Runner, res: ItemResult) -> None:
    small = r.work / "upload-1MB.csv"
    small.write_bytes(DATA.tiled(1 * MB))
    big = r.work / "upload-25MB.csv"
    big.write_bytes(DATA.tiled(25 * MB))
    size = big.stat().st_size
    curl = f"curl -sS -f -o /dev/null -H 'x-smt-upload-token: {TOKEN}' -F file=@"
    # peak RSS after 1 MB uploads (fresh server)
    proc, url, inbox = start_upload_server(r, "up1")
    idle_1 = proc_memory(proc.pid)
    for _ in range(5):
        if r.run(f"{curl}{small} {url}/upload").returncode != 0:
            raise BenchError("1 MB upload failed")
    mem_1 = proc_memory(proc.pid)
    r.stop(proc)
    # 25 MB uploads: ours (fresh server) vs nginx
    proc, url, inbox = start_upload_server(r, "up25")
    idle_25 = proc_memory(proc.pid)
    nginx_dir = r.work / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nginx_dir / sub).mkdir(parents=True, exist_ok=True)
    nport, nport2, nport_tls = free_port(), free_port(), free_port()
    cert, _ = make_tls_cert(r, nginx_dir)
    conf = nginx_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(w=nginx_dir, port=nport, port2=nport2, port_tls=nport_tls))
    nginx = r.spawn(
        ["nginx", "-p", str(nginx_dir), "-c", str(conf), "-e", str(nginx_dir / "error.log")],
        "nginx.log",
    )
    wait_http(f"http://127.0.0.1:{nport2}/stored")
    caddy, cport = start_caddy_front(r, nginx_dir, int(url.rsplit(":", 1)[1]))
    tls = f"--cacert {cert} "
    # Caddy's peak RSS after 1 MB uploads, then after the 25 MB runs below
    for _ in range(5):
        if r.run(f"{curl}{small} {tls}https://localhost:{cport}/upload").returncode != 0:
            raise BenchError("1 MB upload through Caddy failed")
    caddy_1 = proc_memory(caddy.pid)
    runs = 5
    clear_ours = f"find {inbox} -maxdepth 1 -name '2*' -delete"
    clear_nginx = f"rm -f {nginx_dir}/body/*"
    prepare = {
        "smt-droplet upload-server": clear_ours,
        "nginx client_body_in_file_only": clear_nginx,
        "Caddy (TLS) -> smt-droplet upload-server": clear_ours,
        "nginx TLS client_body_in_file_only": clear_nginx,
    }
    nginx_curl = f"curl -sS -f -o /dev/null -F file=@{big} "
    stats = r.hyperfine(
        "upload",
        {
            "smt-droplet upload-server": f"{curl}{big} {url}/upload",
            "nginx client_body_in_file_only": f"{nginx_curl}http://127.0.0.1:{nport}/upload",
            "Caddy (TLS) -> smt-droplet upload-server": f"{curl}{big} {tls}"
            f"https://localhost:{cport}/upload",
            "nginx TLS client_body_in_file_only": f"{nginx_curl}{tls}"
            f"https://localhost:{nport_tls}/upload",
        },
        runs=runs,
        warmup=1,
        prepare=prepare,
    )
    stored = [p.stat().st_size for p in inbox.iterdir() if p.name.startswith("2")]
    kept = [p.stat().st_size for p in (nginx_dir / "body").iterdir()]
    if stored != [size] or not kept or kept[0] < size:
        raise BenchError(f"upload: stored {stored}, nginx kept {kept}, expected {size} bytes")
    mem_25 = proc_memory(proc.pid)
    caddy_25 = proc_memory(caddy.pid)
    r.stop(caddy)
    r.stop(proc)
    r.stop(nginx, signal.SIGQUIT)
    t_ours = stats["smt-droplet upload-server"]["mean"]
    t_nginx = stats["nginx client_body_in_file_only"]["mean"]
    t_ours_tls = stats["Caddy (TLS) -> smt-droplet upload-server"]["mean"]
    t_nginx_tls = stats["nginx TLS client_body_in_file_only"]["mean"]
    ratio = t_nginx / t_ours
    ratio_tls = t_nginx_tls / t_ours_tls
    growth = mem_25["VmHWM"] / mem_1["VmHWM"]
    caddy_growth = caddy_25["VmHWM"] / caddy_1["VmHWM"]
    res.raw = {
        "bytes": size,
        "hyperfine": stats,
        "mem_1MB": {"idle": idle_1, "after": mem_1},
        "mem_25MB": {"idle": idle_25, "after": mem_25},
        "caddy": {"after_1MB": caddy_1, "after_25MB": caddy_25},
    }
    res.rows += [
        Row(
            item=res.item,
            metric=f"{size / MB:.0f} MB upload with curl -F (mean of {runs})",
            ours=f"{size / MB / t_ours:.0f} MB/s ({t_ours:.3f} s)",
            baseline=f"nginx body to file: {size / MB / t_nginx:.0f} MB/s ({t_nginx:.3f} s)",
            ratio=f"{ratio:.2f}x nginx",
            target="≥ 0.5x nginx",
            met=yes_no(ratio >= 0.5),
        ),
        Row(
            item=res.item,
            metric=f"{size / MB:.0f} MB upload through the TLS front: Caddy (the role's "
            f"Caddyfile) → upload server, mean of {runs}",
            ours=f"{size / MB / t_ours_tls:.0f} MB/s ({t_ours_tls:.3f} s)",
            baseline=f"nginx TLS, body to file: {size / MB / t_nginx_tls:.0f} MB/s "
            f"({t_nginx_tls:.3f} s)",
            ratio=f"{ratio_tls:.2f}x nginx TLS",
            target="≥ 0.5x nginx with TLS",
            met=yes_no(ratio_tls >= 0.5),
            note="TLS: one self-signed ECDSA P-256 certificate for both; curl --cacert",
        ),
        Row(
            item=res.item,
            metric="Caddy peak RSS (VmHWM) after 5 x 1 MB, then after 6 x 25 MB uploads",
            ours=f"25 MB: {caddy_25['VmHWM'] / 1024:.1f} MB",
            baseline=f"1 MB: {caddy_1['VmHWM'] / 1024:.1f} MB",
            ratio=f"{caddy_growth:.2f}x (1.00 = flat)",
            target="flat (≤ 1.1x)",
            met=yes_no(caddy_growth <= 1.1),
        ),
        Row(
            item=res.item,
            metric="server peak RSS (VmHWM) after 5 x 1 MB vs 12 x 25 MB uploads (6 through Caddy)",
            ours=f"25 MB: {mem_25['VmHWM'] / 1024:.1f} MB (idle {idle_25['VmHWM'] / 1024:.1f})",
            baseline=f"1 MB: {mem_1['VmHWM'] / 1024:.1f} MB (idle {idle_1['VmHWM'] / 1024:.1f})",
            ratio=f"{growth:.2f}x (1.00 = flat)",
            target="flat (≤ 1.1x)",
            met=yes_no(growth <= 1.1),
        ),
    ]
    shutil.rmtree(nginx_dir, ignore_errors=True)
    for name in ("up1", "up25"):
        shutil.rmtree(r.work / f"{name}-inbox", ignore_errors=True)
        shutil.rmtree(r.work / f"{name}-spool", ignore_errors=True)


# -- 6: webhook -------------------------------------------------------------------------------

HOOK_SCRIPT = """\
#!/bin/sh
# queue a request file, like our webhook's spool entry (no fsync)
printf '{{"source":"webhook","reason":"bench"}}\\n' > "{spool}/$(date +%s%N)-$$.json"
"""


def start_webhook(r: Runner, name: str, max_queued: int) -> tuple[Any, str]:
    port = free_port()
    env = dict(r.env)
    env.update(
        {
            "INTELLIWATT_WEBHOOK_SECRET": SECRET,
            "SMT_SPOOL_DIR": str(r.work / f"{name}-spool"),
            "SMT_WEBHOOK_BIND": "127.0.0.1",
            "SMT_WEBHOOK_PORT": str(port),
            "SMT_WEBHOOK_MAX_QUEUED": str(max_queued),
        }
    )
    proc = r.spawn([str(CLI), "webhook-server"], f"{name}.log", env=env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health")
    return proc, base + "/trigger/smt-now"


def wrk(r: Runner, url: str, secret: str, connections: int, seconds: int) -> dict[str, Any]:
    env = dict(r.env, BENCH_SECRET=secret, BENCH_HEADER="x-intelliwatt-secret")
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    argv += ["-s", str(BENCH / "webhook.lua"), url]
    shown = f"BENCH_SECRET={'<secret>' if secret == SECRET else '<wrong>'} {shlex.join(argv)}"
    r.note_command(shown)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk {url} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    out = json.loads(line.split(" ", 1)[1])
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    return out


def fmt_wrk(w: dict[str, Any]) -> str:
    return f"{w['rps']:.0f} req/s, p99 {w['p99_us'] / 1000:.1f} ms"


def bench_webhook(r: Runner, res: ItemResult) -> None:
    seconds = 2 if r.quick else 10
    results: dict[str, dict[str, Any]] = {}
    # ours, queue cap raised: every authorized request writes (and fsyncs) a spool request
    proc, url = start_webhook(r, "wh-queue", 10**9)
    results["ours auth (all queued)"] = wrk(r, url, SECRET, 32, seconds)
    results["ours auth c1 (all queued)"] = wrk(r, url, SECRET, 1, seconds)
    queued = len(list((r.work / "wh-queue-spool" / "queue").glob("*.json")))
    r.stop(proc)
    # ours, default cap (20 queued): the flood case, answered 429 queue_full after 20
    proc, url = start_webhook(r, "wh-default", 20)
    results["ours auth (default cap 20)"] = wrk(r, url, SECRET, 32, seconds)
    results["ours unauth"] = wrk(r, url, "wrong-secret", 32, seconds)
    r.stop(proc)
    # adnanh/webhook with the equivalent rule: any of the three headers equals the secret
    hook_dir = r.work / "adnanh"
    (hook_dir / "spool").mkdir(parents=True)
    script = hook_dir / "queue.sh"
    script.write_text(HOOK_SCRIPT.format(spool=hook_dir / "spool"))
    script.chmod(0o755)
    rule = {
        "or": [
            {
                "match": {
                    "type": "value",
                    "value": SECRET,
                    "parameter": {"source": "header", "name": name},
                }
            }
            for name in ("x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret")
        ]
    }
    hooks = [
        {
            "id": "smt-now",
            "execute-command": str(script),
            "command-working-directory": str(hook_dir),
            "http-methods": ["POST"],
            "response-message": "queued\n",
            "trigger-rule": rule,
            "trigger-rule-mismatch-http-response-code": 401,
        }
    ]
    hooks_file = hook_dir / "hooks.json"
    hooks_file.write_text(json.dumps(hooks, indent=2))
    hooks_file.chmod(0o600)
    port = free_port()
    webhook = r.spawn(
        ["webhook", "-hooks", str(hooks_file), "-ip", "127.0.0.1", "-port", str(port)],
        "adnanh.log",
    )
    wait_http(f"http://127.0.0.1:{port}/")
    hook_url = f"http://127.0.0.1:{port}/hooks/smt-now"
    results["adnanh auth"] = wrk(r, hook_url, SECRET, 32, seconds)
    results["adnanh auth c1"] = wrk(r, hook_url, SECRET, 1, seconds)
    results["adnanh unauth"] = wrk(r, hook_url, "wrong-secret", 32, seconds)
    r.stop(webhook)
    time.sleep(0.5)  # queue.sh children still finishing
    hooked = len(list((hook_dir / "spool").glob("*.json")))
    res.raw = {"wrk": results, "ours_queued_files": queued, "adnanh_queued_files": hooked}
    socket_errors = {
        key: w["connect"] + w["read"] + w["write"] + w["timeout"]
        for key, w in results.items()
        if w["connect"] + w["read"] + w["write"] + w["timeout"]
    }
    a, q, d, u = (
        results["adnanh auth"],
        results["ours auth (all queued)"],
        results["ours auth (default cap 20)"],
        results["ours unauth"],
    )
    au = results["adnanh unauth"]
    a1, q1 = results["adnanh auth c1"], results["ours auth c1 (all queued)"]
    res.rows += [
        Row(
            item=res.item,
            metric=f"authorized, 32 conns {seconds} s, shipped config (20 queued, then 429)",
            ours=fmt_wrk(d) + f" ({d['non2xx']} answered 429 queue_full)",
            baseline=f"adnanh/webhook: {fmt_wrk(a)} ({hooked} hook runs finished)",
            ratio=f"{d['rps'] / a['rps']:.2f}x throughput",
            target="≥ 0.5x throughput; p99 < 20 ms",
            met=yes_no(d["rps"] >= 0.5 * a["rps"] and d["p99_us"] < 20_000),
        ),
        Row(
            item=res.item,
            metric=f"authorized, 32 conns {seconds} s, queue cap lifted: every request queued",
            ours=fmt_wrk(q) + f" ({queued} spool files, each fsynced)",
            baseline=f"adnanh/webhook: {fmt_wrk(a)}",
            ratio=f"{q['rps'] / a['rps']:.2f}x throughput",
            target="≥ 0.5x throughput; p99 < 20 ms",
            met=yes_no(q["rps"] >= 0.5 * a["rps"] and q["p99_us"] < 20_000),
        ),
        Row(
            item=res.item,
            metric=f"authorized, 1 conn {seconds} s (light load), every request queued",
            ours=fmt_wrk(q1),
            baseline=f"adnanh/webhook: {fmt_wrk(a1)}",
            ratio=f"{q1['rps'] / a1['rps']:.2f}x throughput",
            target="p99 < 20 ms",
            met=yes_no(q1["p99_us"] < 20_000),
        ),
        Row(
            item=res.item,
            metric=f"unauthorized (wrong secret → 401), 32 conns {seconds} s",
            ours=fmt_wrk(u),
            baseline=f"adnanh/webhook: {fmt_wrk(au)}",
            ratio=f"{u['rps'] / au['rps']:.2f}x throughput",
            target="≥ 0.5x throughput",
            met=yes_no(u["rps"] >= 0.5 * au["rps"]),
        ),
    ]
    if socket_errors:
        res.rows[0].note = "wrk socket errors (connect/read/write/timeout): " + ", ".join(
            f"{k}: {v}" for k, v in socket_errors.items()
        )
    for name in ("wh-queue", "wh-default"):
        shutil.rmtree(r.work / f"{name}-spool", ignore_errors=True)
    shutil.rmtree(hook_dir, ignore_errors=True)


# -- 7: provisioning --------------------------------------------------------------------------


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def slowest_tasks(output: str) -> list[str]:
    """The ``profile_tasks`` summary lines (``role : task ---- 12.34s``), slowest first."""
    found = []
    for line in ANSI.sub("", output).splitlines():
        match = re.match(r"^[\s│|]*(.+?) -{3,} (\d+\.\d+)s\s*$", line)
        if match:
            found.append((float(match.group(2)), match.group(1).strip()))
    found.sort(reverse=True)
    return [f"{name} {secs:.1f} s" for secs, name in found]


def recap_changed(output: str) -> int:
    """The sum of ``changed=`` over the play recap lines."""
    recap = [ln for ln in output.splitlines() if "unreachable=" in ln]
    return sum(int(m) for ln in recap for m in re.findall(r"changed=(\d+)", ln))


def ssh_overlay(host: str) -> Path:
    """The inventory overlay molecule/testbed/ssh-access.yml wrote for ``host`` (in Molecule's
    ephemeral directory of the scenario; the newest one naming the host)."""
    found = [
        path
        for path in (Path.home() / ".ansible" / "tmp").glob(
            "molecule.*.full-stack/testbed/ssh-inventory.yml"
        )
        if f"\n    {host}:\n" in path.read_text(encoding="utf-8")
    ]
    if not found:
        raise BenchError(f"no SSH inventory overlay for {host} (molecule/testbed/ssh-access.yml)")
    return max(found, key=lambda path: path.stat().st_mtime)


def bench_provisioning(r: Runner, res: ItemResult) -> None:
    """``site.yml`` on the full-stack Molecule scenario's droplet container, run by a
    ``git archive HEAD`` copy of the project whose platform is renamed, so a colleague's run of
    the same scenario is untouched. The first converge and a no-op re-converge go over SSH as
    operators run it (sshd on port 22 in the container, the sudo user ``ops``, pipelining and
    ControlPersist: molecule/testbed/ssh-access.yml); a no-op converge over ``podman exec``
    (Molecule's own connection) is beside it. Then issue 15's item 8 on the same container:
    20 webhook triggers, each timed from the 202 to systemd starting ``smt-ingest.service``
    (testbed/trigger_latency.py)."""
    release = os.environ.get("SMT_RELEASE", "bookworm")
    # COLUMNS: molecule boxes Ansible's output to the terminal width; wide lines parse cleanly
    env = dict(r.env, CONTAINERS_CONF=str(REPO / "molecule" / "containers.conf"), COLUMNS="400")
    image = f"localhost/smt-droplet-base:{release}"
    if r.run(["podman", "image", "exists", image], env=env).returncode != 0:
        built = r.run([str(REPO / "scripts" / "build-image.sh"), release], env=env)
        if built.returncode != 0:
            raise BenchError(f"cannot build {image} (scripts/build-image.sh {release})")
    project = r.work / "project"
    project.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive HEAD failed: {archive.stderr.decode()[-300:]}")
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive.stdout, check=True)
    r.note_command(f"git -C {REPO} archive HEAD | tar -x -C $W/project")
    scenario = project / "molecule" / "full-stack" / "molecule.yml"
    if not scenario.is_file() or not (project / "playbooks" / "site.yml").is_file():
        raise BenchError("molecule/full-stack or playbooks/site.yml is not committed on HEAD")
    # Its own container name (the base config names it after the suffix); the export is no git
    # checkout, so the base config is passed explicitly.
    env = {**env, "SMT_MOLECULE_SUFFIX": "-bench"}
    host = f"smt-full-stack-{release}-bench"
    base = ["--base-config", str(project / ".config" / "molecule" / "config.yml")]
    molecule = str(VENV_BIN / "molecule")
    timings: dict[str, float] = {}
    slowest: dict[str, list[str]] = {}
    changes: dict[str, int] = {}
    latency: dict[str, Any] = {}

    def step(label: str, argv: list[str], step_env: dict[str, str]) -> None:
        began = time.monotonic()
        done = r.run(argv, env=step_env, cwd=project, capture_output=True, text=True)
        timings[label] = time.monotonic() - began
        output = done.stdout + done.stderr
        (r.work / f"provision-{label}.log").write_text(output)
        if done.returncode != 0:
            raise BenchError(f"{label} failed: {output[-1500:]}")
        slowest[label] = slowest_tasks(output)
        changes[label] = recap_changed(output)

    try:
        step("create", [molecule, *base, "create", "-s", "full-stack"], env)
        step("prepare", [molecule, *base, "prepare", "-s", "full-stack"], env)
        overlay = ssh_overlay(host)
        testbed = overlay.parent
        ssh_env = {
            **env,
            "MOLECULE_PROJECT_DIRECTORY": str(project),
            "SMT_TESTBED_DIR": str(testbed),
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "ANSIBLE_NOCOLOR": "1",
        }
        over_ssh = [
            str(VENV_BIN / "ansible-playbook"),
            f"--inventory={testbed.parent / 'inventory'}",
            f"--inventory={overlay}",
            "--limit",
            host,
            "playbooks/site.yml",
        ]
        step("converge over SSH", over_ssh, ssh_env)
        step("re-converge over SSH", over_ssh, ssh_env)
        step("re-converge over podman", [molecule, *base, "converge", "-s", "full-stack"], env)
        testbed_vars = (project / "molecule" / "testbed" / "group_vars" / "all.yml").read_text()
        found = re.search(r'^smt_testbed_webhook_secret: "([^"]+)"$', testbed_vars, re.M)
        if found is None:
            raise BenchError("smt_testbed_webhook_secret is not in molecule/testbed/group_vars")
        secret = found.group(1)
        count = 5 if r.quick else 20
        probe = r.run(
            ["podman", "exec", "-e", "INTELLIWATT_WEBHOOK_SECRET", host, "python3",
             "/opt/smt-testbed/trigger_latency.py", "--count", str(count), "--gap", "0.5"],
            env={**env, "INTELLIWATT_WEBHOOK_SECRET": secret},
            capture_output=True,
            text=True,
        )  # fmt: skip
        if probe.returncode != 0 or not probe.stdout.strip():
            raise BenchError(f"trigger_latency.py failed: {(probe.stdout + probe.stderr)[-1500:]}")
        latency = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        r.run(
            [molecule, *base, "destroy", "-s", "full-stack"],
            env=env,
            cwd=project,
            capture_output=True,
        )
    res.raw = {
        "timings_s": timings,
        "changed": changes,
        "release": release,
        "slowest_tasks": slowest,
        "trigger_latency": latency,
    }
    ssh_noop = timings["re-converge over SSH"]
    noop_changed = changes["re-converge over SSH"]
    res.rows.append(
        Row(
            item=res.item,
            metric=f"site.yml on the full-stack droplet container ({release}), over SSH as a "
            "sudo user (pipelining, ControlPersist)",
            ours=f"no-op re-converge {ssh_noop:.1f} s (changed={noop_changed})",
            baseline=f"first converge over SSH {timings['converge over SSH']:.1f} s; no-op "
            f"over podman exec {timings['re-converge over podman']:.1f} s "
            f"(changed={changes['re-converge over podman']})",
            ratio=f"{ssh_noop / timings['re-converge over podman']:.2f}x the podman no-op",
            target="re-converge ≤ 20 s, changed=0",
            met=yes_no(ssh_noop <= 20 and noop_changed == 0),
            note=f"molecule create + prepare (SFTP peer, double, sshd and the sudo user inside "
            f"the container) {timings['create'] + timings['prepare']:.1f} s; slowest tasks of "
            "the no-op over SSH: " + "; ".join(slowest.get("re-converge over SSH", [])[:5]),
        )
    )
    samples = latency.get("samples_s") or []
    p50 = latency.get("p50_s")
    res.rows.append(
        Row(
            item=res.item,
            metric=f"trigger → pass started: webhook 202 to systemd starting smt-ingest.service "
            f"(through Caddy and smt-ingest.path), {len(samples)} triggers",
            ours=f"p50 {p50 * 1000:.0f} ms, p90 {latency['p90_s'] * 1000:.0f} ms, max "
            f"{latency['max_s'] * 1000:.0f} ms"
            if p50 is not None
            else "no sample",
            baseline="— (the old droplet had no trigger path)",
            ratio="—",
            target="p50 ≤ 1 s over 20 triggers",
            met=yes_no(
                p50 is not None and p50 <= 1 and len(samples) >= 20 and not latency["failures"]
            ),
        )
    )


# -- 8: posting throughput inside one pass ----------------------------------------------------


def bench_pass_post(r: Runner, res: ItemResult) -> None:
    """200 small files already in the inbox, posted by one ``ingest --no-sync`` pass (one
    interpreter, one HTTP session) vs the old way: a shell loop running base64 | jq | curl per
    file. Each run starts from an empty ledger; the double answers every post."""
    double = r.web_double()
    count = 40 if r.quick else 200
    inbox = r.work / "pp-inbox"
    total = write_many(inbox, count, (30_000, 30_000), seed=8)
    state = r.work / "pp-state"
    env_file = r.ingest_env(
        "pp",
        r.sftp_peer().root / "pp-unused",
        inbox,
        STATE_FILE=str(state / "posted_sha256"),
    )
    spool = r.work / "spool-pp"
    reset = f"rm -rf {state} {spool} && mkdir {state}"
    legacy_env = dict(r.env, INTELLIWATT_BASE_URL=double.url, ADMIN_TOKEN=TOKEN)
    loop = f'for f in {inbox}/*.csv; do sh {BENCH / "legacy_post.sh"} "$f" {ESIID} || exit 1; done'
    ours = f"{CLI} ingest --no-sync --env-file {env_file}"
    runs = 2 if r.quick else 3
    before = len(double.received())
    stats = r.hyperfine(
        "pass-post",
        {"smt-droplet ingest --no-sync": ours, "shell loop of curl": loop},
        runs=runs,
        prepare=reset,
        env=legacy_env,
    )
    posted = len(double.received()) - before
    if posted != 2 * runs * count:
        raise BenchError(f"pass-post: the double received {posted}, expected {2 * runs * count}")
    r.run(reset)
    wall_ours, rss_ours, _ = r.time_v(["sh", "-c", ours], env=legacy_env)
    wall_loop, rss_loop, _ = r.time_v(["sh", "-c", loop], env=legacy_env)
    t_ours = stats["smt-droplet ingest --no-sync"]["mean"]
    t_loop = stats["shell loop of curl"]["mean"]
    ratio = t_loop / t_ours
    res.raw = {
        "files": count,
        "bytes": total,
        "hyperfine": stats,
        "peak_rss_kb": {"ours": rss_ours, "loop": rss_loop},
        "time_v_wall_s": {"ours": wall_ours, "loop": wall_loop},
    }
    res.rows.append(
        Row(
            item=res.item,
            metric=f"post {count} x {total / count / 1000:.0f} KB from the inbox, one pass "
            f"(mean of {runs})",
            ours=f"{count / t_ours:.0f} files/s ({t_ours:.2f} s), "
            f"peak RSS {rss_ours / 1024:.1f} MB",
            baseline=f"base64 | jq | curl per file: {count / t_loop:.0f} files/s "
            f"({t_loop:.2f} s), peak RSS {rss_loop / 1024:.1f} MB (largest process)",
            ratio=f"{ratio:.2f}x files/s",
            target="≥ 3x the curl loop",
            met=yes_no(ratio >= 3.0),
        )
    )
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(spool, ignore_errors=True)


def bench_delivery(r: Runner, res: ItemResult) -> None:
    """One ``ingest --no-sync`` pass delivering the 12-month file plus 200 x 30 KB (quick: 40),
    by the app's large-file path (raw-upload, plain base64 in parts) and by inline (gzip+base64),
    side by side: wall time, peak RSS, bytes on the wire, requests. Each run starts from an
    empty ledger; the double reassembles the raw-upload parts and the check compares bytes."""
    double = r.web_double()
    count = 40 if r.quick else 200
    inbox = r.work / "dl-inbox"
    total = write_many(inbox, count, (30_000, 30_000), seed=9)
    big = inbox / f"IntervalMeterUsage_{ESIID}_20251101.csv"
    big.write_bytes(DATA.post_file())
    total += big.stat().st_size
    measured: dict[str, dict[str, Any]] = {}
    for mode in ("raw-upload", "inline"):
        state = r.work / f"dl-state-{mode}"
        env_file = r.ingest_env(
            f"dl-{mode}",
            r.sftp_peer().root / "dl-unused",
            inbox,
            STATE_FILE=str(state / "posted_sha256"),
            SMT_DELIVERY=mode,
        )
        walls, rsss = [], []
        for _ in range(1 if r.quick else 3):
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir()
            double.reset()
            wall, rss, _ = r.time_v([str(CLI), "ingest", "--no-sync", "--env-file", str(env_file)])
            walls.append(wall)
            rsss.append(rss)
        requests = double.requests()
        if any(q["status"] != 200 for q in requests):
            raise BenchError(f"delivery ({mode}): the double refused a request")
        if mode == "raw-upload" and double.assembled()[big.name]["content"] != big.read_bytes():
            raise BenchError("delivery (raw-upload): the 12-month file did not reassemble")
        measured[mode] = {
            "wall_s": min(walls),
            "peak_rss_kb": max(rsss),
            "wire_bytes": sum(int(q["body_bytes"]) for q in requests),
            "requests": len(requests),
        }
    raw, inline = measured["raw-upload"], measured["inline"]
    res.raw = {"files": count + 1, "bytes": total, "measured": measured}
    res.rows.append(
        Row(
            item=res.item,
            metric=f"one pass: the 12-month file + {count} x 30 KB ({total / MB:.1f} MB), "
            f"best of {1 if r.quick else 3}",
            ours=f"raw-upload: {raw['wall_s']:.2f} s, {raw['wire_bytes'] / MB:.1f} MB on the wire "
            f"in {raw['requests']} requests, peak RSS {raw['peak_rss_kb'] / 1024:.1f} MB",
            baseline=f"inline (gzip): {inline['wall_s']:.2f} s, "
            f"{inline['wire_bytes'] / MB:.1f} MB in {inline['requests']} requests, "
            f"peak RSS {inline['peak_rss_kb'] / 1024:.1f} MB",
            ratio=f"{raw['wall_s'] / inline['wall_s']:.2f}x time, "
            f"{raw['wire_bytes'] / inline['wire_bytes']:.1f}x bytes",
            target="n/a (the hosted app takes only raw-upload)",
            met="n/a",
        )
    )
    shutil.rmtree(inbox, ignore_errors=True)


# -- 10: over a long link ---------------------------------------------------------------------


def bench_wan(r: Runner, res: ItemResult) -> None:
    """The mirror over a link with a round trip (``testbed/delay_link.py``: every byte delayed
    by a fixed time each way, bandwidth unlimited): one large file, the 12-month CSV and many
    30 KB files, ours vs ``sftp`` vs ``rclone copy`` at one-way delays of 0, 20 and 50 ms.
    Each run is a whole session (connect, host key, auth, list, download), as a pass is."""
    peer = r.sftp_peer()
    big_mb = 5 if r.quick else 50
    runs = 1 if r.quick else 2
    cases: list[tuple[str, int, dict[str, bytes]]] = []
    big = DATA.tiled(big_mb * MB)
    year = DATA.post_file()
    for delay in (0, 20, 50):
        files = 10 if r.quick else (100 if delay == 50 else 300)
        small = {
            f"IntervalMeterUsage_{ESIID}_{i:05d}.csv": DATA.slice(i * 97, 30_000)
            for i in range(files)
        }
        cases.append(("one file", delay, {f"IntervalMeterUsage_{ESIID}_big.csv": big}))
        cases.append(("12-month CSV", delay, {f"IntervalMeterUsage_{ESIID}_year.csv": year}))
        cases.append(("30 KB files", delay, small))
    raw: list[dict[str, Any]] = []
    for label, delay, content in cases:
        link = r.delay_link(delay)
        key = f"wan-{delay}-{len(content)}-{len(next(iter(content.values())))}"
        remote = peer.root / key
        remote.mkdir(parents=True, exist_ok=True)
        for name, data in content.items():
            (remote / name).write_bytes(data)
        total = sum(len(d) for d in content.values())
        dst = {name: r.work / f"{key}-{name}" for name in ("ours", "sftp", "rclone")}
        batch = r.work / f"{key}.sftp"
        batch.write_text(f"lcd {dst['sftp']}\nmget {remote}/*\n")
        env_file = r.ingest_env(
            key, remote, dst["ours"], SMT_PORT=str(link.port), SMT_KNOWN_HOSTS=str(link.known_hosts)
        )
        commands = {
            "smt-droplet sync": f"{CLI} sync --env-file {env_file}",
            "OpenSSH sftp": f"sftp -q -b {batch} {r.ssh_opts(link)} >/dev/null",
            "rclone copy": f"rclone copy {r.rclone_flags(link)} :sftp:{remote} {dst['rclone']}",
        }
        prepare = {
            name: f"rm -rf {d} {r.work / ('spool-' + key)} && mkdir -p {d} && sync"
            for name, d in zip(commands, dst.values(), strict=True)
        }
        stats = r.hyperfine(key, commands, runs=runs, prepare=prepare)
        r.stop(link.proc)
        for name, directory in dst.items():
            if dir_stats(directory) != (len(content), total):
                raise BenchError(f"{key}: {name} left {dir_stats(directory)}")
            shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(remote, ignore_errors=True)
        t = {name: v["mean"] for name, v in stats.items()}
        ours, sftp, rclone = t["smt-droplet sync"], t["OpenSSH sftp"], t["rclone copy"]
        raw.append(
            {
                "case": label,
                "delay_ms": delay,
                "files": len(content),
                "bytes": total,
                "hyperfine": stats,
            }
        )
        big_file = label == "one file"
        if big_file and delay == 50:
            target, met = "≥ 3x sftp", yes_no(sftp / ours >= 3.0)
        elif label == "30 KB files" and delay > 0:
            target, met = "ahead of sftp and rclone", yes_no(ours < sftp and ours < rclone)
        else:
            target, met = "—", "n/a"
        what = f"{len(content)} x 30 KB" if len(content) > 1 else f"{total / MB:.1f} MB"
        res.rows.append(
            Row(
                item=res.item,
                metric=f"{label} ({what}), {delay} ms each way (mean of {runs})",
                ours=f"{ours:.2f} s ({total / MB / ours:.1f} MB/s)",
                baseline=f"sftp {sftp:.2f} s; rclone {rclone:.2f} s",
                ratio=f"{sftp / ours:.2f}x sftp; {rclone / ours:.2f}x rclone",
                target=target,
                met=met,
            )
        )
    res.raw = {"cases": raw}


# -- the report -------------------------------------------------------------------------------

TITLES = {
    "1": "SFTP mirror, one 200 MB file",
    "2": "SFTP mirror, 2,000 files of 30 KB",
    "3": "Idle pass over a growing inbox, and the first mirror",
    "4": "Posting the 12-month SMT file",
    "5": "Upload server, 25 MB",
    "6": "Webhook under load",
    "7": "Provisioning",
    "8": "Posting throughput inside one pass",
    "9": "Delivery by raw-upload beside inline",
    "10": "SFTP over a long link (delayed round trip)",
}


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"

    return {
        "cpu": f"{os.cpu_count()} x {model}",
        "memory": mem,
        "os": f"{distro}, kernel {platform.release()}",
        "python": version([str(VENV_BIN / "python"), "--version"]),
        "openssh": version(["ssh", "-V"]),
        "tools": ", ".join(
            [
                version(["hyperfine", "--version"]),
                version(["wrk", "-v"]).split(" [")[0],
                version(["rclone", "version"]),
                version(["nginx", "-v"]),
                "webhook " + version(["webhook", "-version"]).split()[-1],
            ]
        ),
    }


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [
        BEGIN,
        "",
        f"Last run: {results.get('finished_at', '?')}, `bench/run {results.get('args', '')}`",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m.get('memory', '?')} RAM; {m.get('os', '?')}",
        f"- {m.get('python', '?')}; {m.get('openssh', '?')}",
        f"- Tools: {m.get('tools', '?')}",
        "- A **shared, noisy 2-core VM**: other engineers ran test suites at the same time. Read "
        "the ratios (both sides measured back to back in the same run), not the absolute times.",
        "",
        "| # | What | Ours | Baseline (same run) | Ratio | Target | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for item in ITEMS:
        entry = results.get("items", {}).get(item)
        if entry is None:
            lines.append(f"| {item} | {TITLES[item]} | not run | | | | |")
            continue
        if entry.get("error"):
            lines.append(f"| {item} | {TITLES[item]} | **not measured** | | | | no |")
            notes.append(f"- {item}: not measured ({entry['measured_at']}): {entry['error']}")
            continue
        for row in entry["rows"]:
            cells = [row["metric"], row["ours"], row["baseline"], row["ratio"], row["target"]]
            cells = [c.replace("|", "\\|") for c in cells]
            lines.append(f"| {item} | " + " | ".join(cells) + f" | {row['met']} |")
            if row.get("note"):
                notes.append(f"- {item}: {row['note']}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "### Exact commands of the last run", "", "`$W` is the run's temp directory.", ""]
    for item in ITEMS:
        entry = results.get("items", {}).get(item)
        if not entry or not entry.get("commands"):
            continue
        lines += [f"{item}. {TITLES[item]} ({entry['measured_at']}):", "", "```"]
        lines += entry["commands"]
        lines += ["```", ""]
    lines.append(END)
    return "\n".join(lines)


def write_report(results: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + render(results) + tail)


# -- main -------------------------------------------------------------------------------------


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="smt-bench-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated items to run (default all but 7)")
    parser.add_argument("--provisioning", action="store_true", help="also run item 7 (Molecule)")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--report-dir",
        type=Path,
        help="write results.json and README.md there instead of bench/ (a copy of bench/README.md "
        "is the start; the test suite's smoke run uses it to leave the tree alone)",
    )
    args = parser.parse_args(argv)
    global RESULTS, README
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        RESULTS, README = args.report_dir / "results.json", args.report_dir / "README.md"
        if not README.exists():
            shutil.copyfile(BENCH / "README.md", README)
    wanted = args.only.split(",") if args.only else ["1", "2", "3", "4", "5", "6", "8", "9", "10"]
    if args.provisioning and "7" not in wanted:
        wanted.append("7")
    global DATA
    DATA = Data()
    results: dict[str, Any] = {}
    if RESULTS.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(RESULTS.read_text())
    results.setdefault("items", {})
    results["machine"] = machine()
    results["args"] = " ".join(sys.argv[1:] if argv is None else argv)
    failures = 0
    with work_dir(args.keep) as work:
        runner = Runner(work, args.quick)
        jobs = {
            # --quick (the test suite's smoke run) moves a quarter of the data
            "1": lambda res: bench_sftp(
                runner, res, "one-200MB", 1, (50 if args.quick else 200) * MB
            ),
            "2": lambda res: bench_sftp(
                runner, res, "many-30KB", 500 if args.quick else 2000, 30_000
            ),
            "3": lambda res: bench_idle(runner, res),
            "4": lambda res: bench_post(runner, res),
            "5": lambda res: bench_upload(runner, res),
            "6": lambda res: bench_webhook(runner, res),
            "7": lambda res: bench_provisioning(runner, res),
            "8": lambda res: bench_pass_post(runner, res),
            "9": lambda res: bench_delivery(runner, res),
            "10": lambda res: bench_wan(runner, res),
        }
        try:
            for item in wanted:
                res = ItemResult(item=item, title=TITLES[item], measured_at=now_iso())
                runner.current = res
                began = time.monotonic()
                print(f"[bench] {item}. {TITLES[item]}", file=sys.stderr, flush=True)
                try:
                    jobs[item](res)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    res.error = str(exc)
                    failures += 1
                    print(f"[bench] {item} FAILED: {exc}", file=sys.stderr, flush=True)
                res.raw["elapsed_s"] = round(time.monotonic() - began, 1)
                print(
                    f"[bench] {item} done in {res.raw['elapsed_s']} s", file=sys.stderr, flush=True
                )
                results["items"][item] = asdict(res)
                results["finished_at"] = now_iso()
                write_report(results)
        finally:
            runner.close()
    for item in wanted:
        for row in results["items"][item]["rows"]:
            print(
                f"{item} | {row['metric']} | {row['ours']} | {row['baseline']} | "
                f"{row['ratio']} | {row['target']} | {row['met']}"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
