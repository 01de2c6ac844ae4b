#!/usr/bin/env python3
"""Trigger → pass latency on a provisioned droplet (issue 15, item 8). Run it on the droplet.

Each round waits until ``smt-ingest.service`` is idle, POSTs ``/trigger/smt-now`` through the
TLS front, and then watches systemd for the pass that the spool request starts through
``smt-ingest.path``: the latency is the service's ``InactiveExitTimestampMonotonic`` (when
systemd started it) minus the moment the 202 arrived, both on this machine's monotonic clock.
Rounds whose pass does not start within ``--timeout`` count as failures. Prints one JSON
object: every sample, p50, p90, max, and the failures.

    INTELLIWATT_WEBHOOK_SECRET=... python3 trigger_latency.py --count 20

Standard library only (it runs with the droplet's system python3).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

UNIT = "smt-ingest.service"


def unit_state() -> tuple[str, int]:
    out = subprocess.run(
        ["systemctl", "show", "-p", "ActiveState", "-p", "InactiveExitTimestampMonotonic", UNIT],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return fields.get("ActiveState", ""), int(fields.get("InactiveExitTimestampMonotonic") or 0)


def wait_idle(timeout: float) -> int:
    """Wait for the unit to be inactive (or failed); return its last start stamp."""
    deadline = time.monotonic() + timeout
    while True:
        state, started = unit_state()
        if state in ("inactive", "failed"):
            return started
        if time.monotonic() > deadline:
            raise SystemExit(f"{UNIT} still {state} after {timeout:.0f} s")
        time.sleep(0.05)


def trigger(url: str, secret: str, context: ssl.SSLContext) -> float:
    """POST the trigger; return the monotonic time the 202 arrived."""
    request = urllib.request.Request(  # noqa: S310 (https only: main() checks the URL)
        url, data=b"{}", method="POST",
        headers={"x-intelliwatt-secret": secret, "content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:  # noqa: S310
            arrived = time.monotonic()
            status = answer.status
            answer.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"trigger answered {exc.code}: {exc.read()[:300]!r}") from exc
    if status != 202:
        raise SystemExit(f"trigger answered {status}, expected 202")
    return arrived


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="triggers to send (default 20)")
    parser.add_argument("--url", default="https://localhost/trigger/smt-now")
    parser.add_argument("--cafile", default="/etc/smt-droplet/tls-ca.crt")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for a pass to start")
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    parser.add_argument(
        "--gap", type=float, default=0.0, help="seconds between a pass ending and the next trigger"
    )
    args = parser.parse_args(argv)
    if not args.url.startswith("https://"):
        parser.error("--url must be an https:// URL (the TLS front)")
    secret = os.environ.get("INTELLIWATT_WEBHOOK_SECRET", "")
    if not secret:
        parser.error("set INTELLIWATT_WEBHOOK_SECRET")
    context = ssl.create_default_context(cafile=args.cafile)
    samples: list[float] = []
    failures: list[str] = []
    for round_no in range(1, args.count + 1):
        before = wait_idle(args.idle_timeout)
        time.sleep(args.gap)
        arrived = trigger(args.url, secret, context)
        deadline = arrived + args.timeout
        while True:
            _, started = unit_state()
            if started != before:
                samples.append(started / 1e6 - arrived)
                break
            if time.monotonic() > deadline:
                failures.append(f"round {round_no}: no pass within {args.timeout:.0f} s")
                break
            time.sleep(0.005)
    wait_idle(args.idle_timeout)
    ordered = sorted(samples)
    report = {
        "count": args.count,
        "samples_s": [round(s, 4) for s in samples],
        "p50_s": round(statistics.median(ordered), 4) if ordered else None,
        "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 4) if ordered else None,
        "max_s": round(ordered[-1], 4) if ordered else None,
        "failures": failures,
    }
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
