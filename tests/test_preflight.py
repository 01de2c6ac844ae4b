"""The role refuses the example placeholders and weak or reused secrets before anything changes
(``roles/smt_ingest/tasks/secrets.yml``, run by the preflight, in --check too). Only the
checking task file runs here, on localhost: pure assertions, no host change."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from helpers import ANSIBLE_PLAYBOOK, REPO, run_playbook

pytestmark = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="no ansible-playbook")


def good() -> dict[str, Any]:
    return {
        "smt_ingest_admin_token": secrets.token_hex(32),
        "smt_webhook_secret": secrets.token_hex(32),
        "smt_upload_token": secrets.token_hex(32),
        "smt_upload_ticket_secret": secrets.token_hex(32),
        "smt_ingest_sftp_user": "smt-account-42",
        "smt_ingest_sftp_known_hosts": ["sftp.smt.test ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIReal"],
        "smt_ingest_base_url": "https://intelliwatt.test",
    }


def check(tmp_path: Path, variables: dict[str, Any], *args: str) -> tuple[int, str]:
    plays = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": variables,
            "tasks": [
                {
                    "name": "The secret checks of the preflight",
                    "ansible.builtin.include_role": {
                        "name": "smt_ingest",
                        "tasks_from": "secrets.yml",
                    },
                }
            ],
        }
    ]
    proc, _ = run_playbook(tmp_path, plays, *args, json_output=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_good_secrets_pass(tmp_path: Path) -> None:
    rc, out = check(tmp_path, good())
    assert rc == 0, out[-2000:]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"smt_ingest_admin_token": "0" * 64}, "weak or example secrets: smt_ingest_admin_token"),
        (
            {"smt_webhook_secret": "change-me-change-me-change-me-change-me"},
            "weak or example secrets: smt_webhook_secret",
        ),
        ({"smt_upload_token": "short-but-random-Q9x"}, "weak or example secrets: smt_upload_token"),
        (
            {"smt_upload_token": "SAME-0123456789abcdefghijklmnopqrstuv"},
            "one value used for several secrets: smt_webhook_secret, smt_upload_token",
        ),
        ({"smt_ingest_sftp_user": "CHANGE_ME"}, "is still the example"),
        (
            {"smt_ingest_sftp_known_hosts": ["h ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample"]},
            "is still the example",
        ),
        ({"smt_ingest_base_url": "https://intelliwatt.example.com"}, "is still the example"),
    ],
)
def test_placeholders_and_weak_secrets_are_refused_by_name(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    variables = good() | change
    if "SAME-" in str(change):
        variables["smt_webhook_secret"] = change["smt_upload_token"]
    rc, out = check(tmp_path, variables, "--check")
    assert rc != 0, out[-2000:]
    assert named in " ".join(out.split()), out[-2000:]
    for value in change.values():  # the value itself is never printed
        if isinstance(value, str) and value not in ("CHANGE_ME",):
            assert value not in out


def test_the_example_inventory_is_refused(tmp_path: Path) -> None:
    """Every placeholder of vars.yml and vault.yml.example, as a new user would leave them."""
    import yaml

    group = REPO / "inventory" / "group_vars" / "smt"
    vault = yaml.safe_load((group / "vault.yml.example").read_text())
    variables = {**vault, **yaml.safe_load((group / "vars.yml").read_text())}
    rc, out = check(tmp_path, variables)
    assert rc != 0
    assert "smt_ingest_admin_token" in out and "smt_webhook_secret" in out
