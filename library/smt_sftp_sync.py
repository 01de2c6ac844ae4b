#!/usr/bin/python
"""Ansible module: mirror SMT's SFTP drop into the droplet's inbox (thin wrapper)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smt_sftp_sync
short_description: Mirror Smart Meter Texas SFTP files into the droplet's inbox
description:
  - Connects to SMT's SFTP server with key authentication and a pinned host key, and mirrors
    matching files from O(remote_dir) (and one level of sub-directories) into O(local_dir).
  - A file already local with the same size and mtime is not downloaded again. Downloads go to a
    temporary dot-file in the destination directory, are fsynced, get the remote mtime and are
    renamed into place. Files younger than O(min_age) seconds, or whose size changes while being
    read, are skipped (retried next run).
  - An unknown or changed host key is refused; the failure message says how to pin the key.
  - Takes the same lock as the ingest pass (C(<state_file>.lock)); waits at most O(lock_wait)
    seconds for a running pass, then fails saying another pass is running.
  - All logic lives in the C(smt_droplet) package (shipped through C(module_utils)); this module
    maps options to the droplet's environment names and results back.
version_added: "0.1.0"
author: IntelliWatt droplet team
options:
  env_file:
    description:
      - Read settings from this systemd-style environment file (the droplet's
        C(/etc/default/intelliwatt-smt)). Options given explicitly override its values.
    type: path
  host:
    description: SFTP host (C(SMT_HOST)).
    type: str
  port:
    description: SFTP port (C(SMT_PORT)); default 22.
    type: int
  user:
    description: SFTP user (C(SMT_USER)).
    type: str
  key:
    description: Private key for the SFTP user (C(SMT_KEY)); ed25519, ECDSA or RSA, unencrypted.
    type: path
  known_hosts:
    description:
      - OpenSSH known_hosts file pinning SMT's host key (C(SMT_KNOWN_HOSTS)); entries for a
        non-22 port are written C([host]:port).
    type: path
  host_key_policy:
    description:
      - C(reject) refuses unknown hosts. C(accept-new) records the key of a host not yet in
        O(known_hosts) (never a changed one). Default C(reject).
    type: str
    choices: [reject, accept-new]
  remote_dir:
    description: Remote directory to mirror (C(SMT_REMOTE_DIR)).
    type: str
  local_dir:
    description: The inbox (C(SMT_LOCAL_DIR)).
    type: path
  include:
    description:
      - Case-insensitive globs for base names (C(SMT_INCLUDE)). Default C(*.csv), C(*.csv.*),
        C(*DailyMeterUsage*.asc), C(*IntervalMeterUsage*.asc).
    type: list
    elements: str
  min_age:
    description: Skip remote files younger than this many seconds (C(SMT_MIN_AGE)); default 0.
    type: float
  retries:
    description: Connection attempts after the first (C(SMT_SFTP_RETRIES)); default 3.
    type: int
  state_file:
    description:
      - The ledger (C(STATE_FILE)); only used to find the lock file beside it. Default
        C(<local_dir>/.posted_sha256).
    type: path
  lock_wait:
    description: Seconds to wait for a running ingest pass (C(SMT_LOCK_WAIT)); default 300.
    type: float
requirements:
  - python3-paramiko (paramiko >= 2.12) on the target
attributes:
  check_mode:
    support: full
    description: Connects and lists; reports what would be downloaded; downloads nothing.
  diff_mode:
    support: none
notes:
  - Options are the droplet's environment names in lower case; each is required either as an
    option or through O(env_file).
"""

EXAMPLES = r"""
- name: Mirror SMT files using the droplet's env file
  smt_sftp_sync:
    env_file: /etc/default/intelliwatt-smt
    state_file: /home/deploy/smt_inbox/.posted_sha256

- name: Mirror with explicit settings, only interval files, skipping files younger than 2 minutes
  smt_sftp_sync:
    host: ftp.smartmetertexas.biz
    user: intelliwatt
    key: /home/deploy/.ssh/smt_ed25519
    known_hosts: /etc/ssh/smt_known_hosts
    remote_dir: /adhocusage
    local_dir: /home/deploy/smt_inbox
    include: ["*IntervalMeterUsage*", "*.csv"]
    min_age: 120
"""

RETURN = r"""
files:
  description: Every matching remote file and what happened to it.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: Path relative to the inbox (and to O(remote_dir)).
      type: str
    size:
      description: Remote size in bytes.
      type: int
    status:
      description: >-
        C(downloaded), C(unchanged), C(would-download) (check mode), C(skipped-young),
        C(skipped-growing) or C(failed).
      type: str
    reason:
      description: Why a file was skipped or failed.
      type: str
  sample: [{"path": "IntervalMeterUsage_10443720000000099_20251101.csv", "size": 2612345,
            "status": "downloaded", "reason": ""}]
downloaded:
  description: Paths downloaded (or that would be, in check mode).
  returned: always
  type: list
  elements: str
log:
  description: The package's log lines for this run (never a secret).
  returned: always
  type: list
  elements: str
"""

import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import paramiko  # noqa: F401

    PARAMIKO_ERROR = None
except ImportError:
    PARAMIKO_ERROR = traceback.format_exc()

from ansible.module_utils.smt_droplet.ansible_support import pass_lock, run_module
from ansible.module_utils.smt_droplet.config import InboxSettings, SftpSettings

OPTION_ENV = {
    "host": "SMT_HOST",
    "port": "SMT_PORT",
    "user": "SMT_USER",
    "key": "SMT_KEY",
    "known_hosts": "SMT_KNOWN_HOSTS",
    "host_key_policy": "SMT_HOST_KEY_POLICY",
    "remote_dir": "SMT_REMOTE_DIR",
    "local_dir": "SMT_LOCAL_DIR",
    "include": "SMT_INCLUDE",
    "min_age": "SMT_MIN_AGE",
    "retries": "SMT_SFTP_RETRIES",
    "state_file": "STATE_FILE",
    "lock_wait": "SMT_LOCK_WAIT",
}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "env_file": {"type": "path"},
            "host": {"type": "str"},
            "port": {"type": "int"},
            "user": {"type": "str"},
            "key": {"type": "path", "no_log": False},
            "known_hosts": {"type": "path"},
            "host_key_policy": {"type": "str", "choices": ["reject", "accept-new"]},
            "remote_dir": {"type": "str"},
            "local_dir": {"type": "path"},
            "include": {"type": "list", "elements": "str"},
            "min_age": {"type": "float"},
            "retries": {"type": "int"},
            "state_file": {"type": "path"},
            "lock_wait": {"type": "float"},
        },
        supports_check_mode=True,
    )
    if PARAMIKO_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib("paramiko") + " On Debian/Ubuntu: install python3-paramiko.",
            exception=PARAMIKO_ERROR,
        )
    from ansible.module_utils.smt_droplet.sftp_mirror import HostKeyError
    from ansible.module_utils.smt_droplet.sync import run_sync

    def sync(env: dict[str, str]) -> Any:
        settings = SftpSettings.from_env(env)
        inbox = InboxSettings.from_env(env)
        with pass_lock(inbox.state_file, inbox.lock_wait, module.check_mode):
            return run_sync(settings, dry_run=module.check_mode)

    mirrored, lines = run_module(
        module, OPTION_ENV, sync, refused=(HostKeyError, "SFTP host key refused")
    )
    files = [
        {"path": f.rel, "size": f.size, "status": f.status, "reason": f.reason}
        for f in mirrored.files
    ]
    wanted = "would-download" if module.check_mode else "downloaded"
    downloaded = [f.rel for f in mirrored.files if f.status == wanted]
    result = {"changed": bool(downloaded), "files": files, "downloaded": downloaded, "log": lines}
    if mirrored.failed:
        module.fail_json(msg=f"SFTP sync failed: {mirrored.error}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
