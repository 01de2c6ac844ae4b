"""The droplet's PGP key (issue 7): in the ingest user's keyring, usable with the passphrase
file, reachable from the sandboxed unit, imported only when missing, never in Ansible's output.

The key is the throwaway one prepare.yml generated in the scenario's ephemeral directory.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

UNITS = ("smt-ingest.service",)
REPO = Path(__file__).resolve().parents[3]
SCENARIO = REPO / "molecule" / "smt_ingest"
GNUPG_HOME = "/home/deploy/.gnupg"
PASSPHRASE_FILE = f"{GNUPG_HOME}/smt-passphrase"
ENV_FILE = "/etc/default/intelliwatt-smt"
TEST_VARS = yaml.safe_load((SCENARIO / "vars" / "pgp.yml").read_text(encoding="utf-8"))
PASSPHRASE = TEST_VARS["smt_pgp_test_passphrase"]


def ephemeral() -> Path:
    path = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    if not path:
        pytest.skip("needs Molecule's ephemeral directory (molecule verify)")
    return Path(path)


def fingerprint() -> str:
    return (ephemeral() / "pgp_secret.asc.fpr").read_text().strip()


def as_deploy_gpg(host, args: str, stdin: str | None = None):
    cmd = f"runuser -u deploy -- gpg --homedir {GNUPG_HOME} --batch --no-tty {args}"
    if stdin is not None:
        cmd = f"printf '%s' '{stdin}' | {cmd}"
    result = host.run(cmd)
    host.run(f"runuser -u deploy -- gpgconf --homedir {GNUPG_HOME} --kill gpg-agent")
    return result


def test_gnupg_installed(host):
    assert host.package("gnupg").is_installed


def test_gnupg_home_private_to_the_ingest_user(host):
    home = host.file(GNUPG_HOME)
    assert home.is_directory
    assert (home.user, home.group, home.mode) == ("deploy", "deploy", 0o700)
    secret = host.file(PASSPHRASE_FILE)
    assert (secret.user, secret.mode) == ("deploy", 0o400)


def test_secret_key_in_the_keyring(host):
    out = as_deploy_gpg(host, "--with-colons --list-secret-keys")
    assert out.rc == 0, out.stderr
    fprs = re.findall(r"^fpr:(?::[^:]*){7}:([0-9A-F]{40}):", out.stdout, re.M)
    assert fingerprint() in fprs, out.stdout


def test_env_file_names_home_and_passphrase_file(host):
    content = host.file(ENV_FILE).content_string
    assert f"\nSMT_GNUPG_HOME={GNUPG_HOME}\n" in content
    assert f"\nSMT_GNUPG_PASSPHRASE_FILE={PASSPHRASE_FILE}\n" in content
    assert PASSPHRASE not in content


def test_unit_binds_the_gnupg_home_read_write(host):
    out = host.run("systemctl show -p BindPaths --value smt-ingest.service").stdout
    assert f"{GNUPG_HOME}:{GNUPG_HOME}" in out, out


def test_round_trip_with_the_passphrase_file(host):
    """What SMT does (encrypt to the droplet's public key), then what the pass does (decrypt as
    deploy with the passphrase from the file, loopback pinentry)."""
    fpr = fingerprint()
    sender = host.run("mktemp -d /tmp/pgp-sender.XXXXXX").stdout.strip()
    try:
        exported = as_deploy_gpg(host, f"--armor --export {fpr}")
        assert "PUBLIC KEY BLOCK" in exported.stdout
        host.run(f"printf '%s' '{exported.stdout}' > {sender}/droplet.pub")
        g = f"gpg --homedir {sender} --batch --no-tty"
        assert host.run(f"{g} --import {sender}/droplet.pub").rc == 0
        enc = host.run(
            f"echo molecule-round-trip | {g} --trust-model always --armor "
            f"--recipient {fpr} --encrypt > {sender}/msg.asc"
        )
        assert enc.rc == 0, enc.stderr
        host.run(f"chmod 0755 {sender} && chmod 0644 {sender}/msg.asc")
        dec = as_deploy_gpg(
            host,
            f"--pinentry-mode loopback --passphrase-file {PASSPHRASE_FILE} "
            f"--decrypt {sender}/msg.asc",
        )
        assert dec.rc == 0, dec.stderr
        assert dec.stdout.strip() == "molecule-round-trip"
    finally:
        host.run(f"gpgconf --homedir {sender} --kill all; rm -rf {sender}")


def test_missing_key_is_imported_again_without_showing_it(host):
    """Remove the key from the keyring, converge with -vv --diff: the import task changes, the
    key comes back, and neither the armored key nor the passphrase shows in the output; the
    converge right after reports changed=0."""
    eph = ephemeral()
    fpr = fingerprint()
    removed = as_deploy_gpg(host, f"--yes --delete-secret-and-public-keys {fpr}")
    assert removed.rc == 0, removed.stderr
    assert fpr not in as_deploy_gpg(host, "--with-colons --list-secret-keys").stdout

    env = dict(
        os.environ,
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_LIBRARY=str(REPO / "library"),
        ANSIBLE_MODULE_UTILS=str(REPO / "src"),
        ANSIBLE_PIPELINING="true",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    cmd = [
        "ansible-playbook",
        "-i",
        str(eph / "inventory"),
        "--limit",
        host.backend.name,
        "--diff",
        "-vv",
        str(SCENARIO / "converge.yml"),
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    task = output.split("Import the PGP key", 1)[1].split("TASK [", 1)[0]
    assert re.search(r"^changed: \[", task, re.M), task
    assert fpr in as_deploy_gpg(host, "--with-colons --list-secret-keys").stdout

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    output += second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert re.search(r"\bchanged=0\b", second.stdout), second.stdout[-3000:]

    armored = (eph / "pgp_secret.asc").read_text()
    body = [
        line for line in armored.splitlines() if len(line) >= 32 and not line.startswith("-----")
    ]
    assert body
    leaked = [line for line in body if line in output]
    assert not leaked, f"{len(leaked)} lines of the armored key in the Ansible output"
    assert "PRIVATE KEY BLOCK" not in output
    assert PASSPHRASE not in output
