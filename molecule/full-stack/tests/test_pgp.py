"""One PGP-encrypted SMT delivery end to end (issue 7): a zip holding a billing CSV and an
interval CSV, encrypted to the droplet's key (the one smt_ingest imported from the vault
variable), placed on the SFTP peer; one pass of the sandboxed smt-ingest.service posts the
interval CSV once, with its ESIID, and never the billing CSV.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Bed, PlacedFile

GNUPG_HOME = "/home/deploy/.gnupg"
INBOX = "/home/deploy/smt_inbox"
ENV_FILE = "/etc/default/intelliwatt-smt"

ZIP_SCRIPT = """
import sys, zipfile
out, billing_name, billing_esiid, interval = sys.argv[1:5]
billing = ("ESIID,BILL_START,BILL_END,KWH,AMOUNT\\n"
           f"'{billing_esiid},10/1/2025,10/31/2025,912,101.37\\n")
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr(billing_name, billing)  # first: a "first .csv" choice would post this one
    zf.write(interval, interval.rsplit("/", 1)[1])
"""


@pytest.fixture
def workdir(bed: Bed) -> Iterator[str]:
    path = bed.run("mktemp -d /tmp/pgp-delivery.XXXXXX").stdout.strip()
    yield path
    bed.host.run(f"gpgconf --homedir {path}/sender --kill all; rm -rf {shlex.quote(path)}")


def encrypted_delivery(bed: Bed, workdir: str) -> tuple[PlacedFile, str, str, str]:
    """Build the zip, encrypt it to the droplet's public key, put it on the peer.
    Returns (the interval CSV, the billing CSV's ESIID, the .asc name, the .asc sha256)."""
    interval = bed.make_csv(workdir)
    billing_esiid = "1044372" + "".join(secrets.choice("0123456789") for _ in range(10))
    billing_name = f"BillingData_{billing_esiid}_20251101.csv"
    zip_path = f"{workdir}/delivery.zip"
    bed.run(
        shlex.join(
            ["python3", "-c", ZIP_SCRIPT, zip_path, billing_name, billing_esiid, interval.path]
        )
    )
    # What SMT holds: the droplet's public key (exported from the keyring the role filled).
    bed.run(
        f"runuser -u deploy -- gpg --homedir {GNUPG_HOME} --batch --no-tty --armor --export"
        f" > {workdir}/droplet.pub"
    )
    bed.host.run(f"runuser -u deploy -- gpgconf --homedir {GNUPG_HOME} --kill gpg-agent")
    assert "PUBLIC KEY BLOCK" in bed.run(f"head -1 {workdir}/droplet.pub").stdout
    asc_name = f"IntervalMeterUsage_pgp_{secrets.token_hex(4)}.asc"  # no ESIID in the name
    staged = f"{workdir}/{asc_name}"
    bed.run(
        f"install -d -m 0700 {workdir}/sender && gpg --homedir {workdir}/sender --batch "
        f"--no-tty --trust-model always --armor --recipient-file {workdir}/droplet.pub "
        f"--output {staged} --encrypt {zip_path}"
    )
    assert "BEGIN PGP MESSAGE" in bed.run(f"head -1 {staged}").stdout
    sha = bed.run(f"sha256sum {staged}").stdout.split()[0]
    bed.run(f"chmod 0644 {staged} && mv {staged} {bed.remote_dir}/{asc_name}")
    return interval, billing_esiid, asc_name, sha


def test_encrypted_delivery_posts_the_interval_csv_once(bed: Bed, workdir: str) -> None:
    env = bed.run(f"cat {ENV_FILE}").stdout
    assert f"\nSMT_GNUPG_HOME={GNUPG_HOME}\n" in env, "the role did not enable PGP"
    interval, billing_esiid, asc_name, asc_sha = encrypted_delivery(bed, workdir)
    before = bed.received()

    bed.run("systemctl start smt-ingest.service")

    posts = bed.posts_of(interval.sha256)
    assert len(posts) == 1, posts
    assert posts[0]["esiid"] == interval.esiid
    assert posts[0]["filename"] == interval.name
    new = bed.received()[len(before) :]
    assert all(r["esiid"] != billing_esiid for r in new), new
    assert all("BillingData" not in r["filename"] for r in new), new
    assert len(new) == 1, new

    ledger = bed.run(f"cat {INBOX}/.posted_sha256").stdout.split()
    assert asc_sha in ledger and interval.sha256 in ledger
    # The plaintext never lands in the inbox (it lives in the unit's private /tmp and is gone),
    # and the gpg-agent the pass started ended with the oneshot's cgroup.
    assert bed.host.run(f"ls {INBOX}/{interval.name}").rc != 0
    assert bed.host.run("pgrep -u deploy gpg-agent").rc != 0
    status = bed.run(
        f"runuser -u deploy -- env PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/smt-droplet "
        f"STATE_FILE={INBOX}/.posted_sha256 "
        f"python3 -m smt_droplet status --env-file {ENV_FILE}"
    ).stdout
    line = next((row for row in status.splitlines() if asc_name in row), "")
    assert line.startswith("posted") and f"pgp-member={interval.name}" in line, status

    # The next pass neither decrypts nor posts it again.
    bed.run("systemctl start smt-ingest.service")
    assert len(bed.posts_of(interval.sha256)) == 1
    journal = bed.journal(("smt-ingest.service",), lines=200)
    assert journal.count(asc_name) >= 1, journal


def test_pass_sandbox_can_use_the_keyring(host: Any) -> None:
    """The GnuPG home is bound read-write into the unit (gpg-agent's socket and locks)."""
    out = host.run("systemctl show -p BindPaths --value smt-ingest.service").stdout
    assert f"{GNUPG_HOME}:{GNUPG_HOME}" in out, out
