#!/usr/bin/python
"""Ansible module: post unposted inbox files to IntelliWatt (inline or raw-upload; thin wrapper)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smt_inline_post
short_description: Post the droplet's unposted SMT files to IntelliWatt (inline or raw-upload)
description:
  - For every matching file in O(local_dir) (and one level of sub-directories), or only O(paths),
    that is not in the ledger O(state_file), attributes an ESIID and meter and POSTs it to the
    web app, exactly as its contract says, by O(delivery) - C(inline) to
    C(<base_url>/api/admin/smt/pull) (C(mode=inline), base64+gzip), or C(raw-upload) to
    C(<base_url>/api/admin/smt/raw-upload) in parts that each fit O(max_body_bytes) (whole lines,
    the header in every part, C(postIngest) on the last). A file counts as posted only when all
    its parts were accepted.
  - Each posted file gets a landing verdict from what the app says it stored (raw-upload's
    C(normalizedInline)) beside the file's own intervals - C(exact), C(short), C(none),
    C(mismatch), or C(unverified) for inline (its answer carries no count).
  - 400 C(INLINE_DISABLED) (the hosted app since December 2025) stops at once and fails the task,
    naming the setting to change; 400 C(HOME_ID_REQUIRED) leaves the file C(waiting-for-app),
    tried again every C(SMT_WAITING_RETRY_SECONDS) (6 h) until the app knows the ESIID.
  - ESIID from the file name (17 digits starting with C(10)), else the CSV's ESIID column, else
    O(esiid_default); meter from an C(M<digits>) token in the name, else O(meter_default).
  - A 200 C(ok=true) answer (new or duplicate) appends the file's sha256 to O(state_file), which
    keeps the old droplets' one-digest-per-line format. Other 4xx answers mark the file rejected;
    a body over O(max_body_bytes) marks it too large without sending it; neither is retried until
    the file changes or O(force=true). 5xx, timeouts, 413 and 429 are retried with backoff.
  - 401 or 503 from the app stops at once and fails the task (token or app misconfigured).
  - A file whose content is an ASCII-armored PGP message (SMT's C(*.asc) deliveries) is decrypted
    with the key in O(gnupg_home), and the interval CSV inside its zip is attributed and posted
    under the zip member's name; the ledger records the C(.asc) digest (no second decryption) and
    the CSV's. A delivery that cannot be unpacked (wrong key, corrupt armor, not a zip, no CSV,
    zip bomb) is marked rejected, reason C(pgp:<code>) and the cause, and is not retried
    until it changes.
  - Takes the ingest pass lock (C(<state_file>.lock)); waits at most O(lock_wait) seconds.
  - All logic lives in the C(smt_droplet) package (shipped through C(module_utils)).
version_added: "0.1.0"
author: IntelliWatt droplet team
options:
  env_file:
    description:
      - Read settings from this systemd-style environment file (the droplet's
        C(/etc/default/intelliwatt-smt)). Options given explicitly override its values.
    type: path
  base_url:
    description: The web app's base URL (C(INTELLIWATT_BASE_URL)).
    type: str
  admin_token:
    description: The app's admin token (C(ADMIN_TOKEN)); sent only as the C(x-admin-token) header.
    type: str
  local_dir:
    description: The inbox (C(SMT_LOCAL_DIR)).
    type: path
  state_file:
    description:
      - The ledger (C(STATE_FILE), set by the unit's drop-in on the droplet); default
        C(<local_dir>/.posted_sha256).
    type: path
  source:
    description: Storage prefix sent as C(source) (C(SOURCE_TAG)); default C(adhocusage).
    type: str
  esiid_default:
    description: ESIID for files that carry none in name or content (C(ESIID_DEFAULT)).
    type: str
  meter_default:
    description: Meter for files without an C(M<digits>) name token (C(METER_DEFAULT)), default M1.
    type: str
  delivery:
    description:
      - The app's endpoint (C(SMT_DELIVERY)) - C(inline) (the default; the contract the droplet was
        specified with) or C(raw-upload) (the large-file path the hosted app accepts since
        December 2025).
    type: str
    choices: [inline, raw-upload]
  encoding:
    description: C(base64+gzip) (default) or C(base64) (C(SMT_ENCODING)); inline only.
    type: str
    choices: [base64+gzip, base64]
  max_body_bytes:
    description: Largest request body sent (C(SMT_MAX_BODY_BYTES)); default 4500000.
    type: int
  include:
    description: Case-insensitive globs for candidate files (C(SMT_INCLUDE)).
    type: list
    elements: str
  paths:
    description: Only these files (each must exist); default every matching inbox file.
    type: list
    elements: path
  force:
    description: Post even files already in the ledger, rejected or too large.
    type: bool
    default: false
  retries:
    description: Retries per file for retryable failures (C(SMT_POST_RETRIES)); default 3.
    type: int
  http_timeout:
    description: Seconds per request (C(SMT_HTTP_TIMEOUT)); default 60.
    type: float
  lock_wait:
    description: Seconds to wait for a running ingest pass (C(SMT_LOCK_WAIT)); default 300.
    type: float
  gnupg_home:
    description:
      - GnuPG home holding the droplet's private key, for PGP deliveries (C(SMT_GNUPG_HOME));
        default C(~/.gnupg) of the user the module runs as.
    type: path
  spool_dir:
    description: >-
      The ingest spool (C(SMT_SPOOL_DIR)); the pass's record is written to its
      C(status/last-ingest.json), as the timer's pass does. Default C(/var/spool/smt-ingest).
    type: path
  metrics_dir:
    description: >-
      node_exporter textfile directory for C(smt_ingest.prom) (C(SMT_METRICS_DIR)); unset: no
      metrics file.
    type: path
  sync_error:
    description: >-
      The SFTP sync of this pass failed with this message (from M(smt_sftp_sync)); the pass's
      record then says so and its exit code is 1, like a timer pass whose sync failed.
    type: str
  fail_on_retry:
    description: >-
      Fail when something is left to retry (exit code 1). C(false) returns normally with
      C(exit_code) and C(left_to_retry), for a playbook that reports first and fails at the end.
    type: bool
    default: true
requirements:
  - python3-requests (requests >= 2.28) on the target
attributes:
  check_mode:
    support: full
    description: >-
      Hashes and attributes files; reports which would be posted; sends nothing. PGP deliveries
      are not decrypted in check mode (no plaintext is written, no gpg-agent started): they are
      reported as C(would-post) with the ESIID their C(.asc) name or the defaults give.
  diff_mode:
    support: none
notes:
  - The token is never logged nor returned (C(no_log)).
  - The run is one ingest pass like the timer's (except in check mode) - its log lines go to the
    journal under the units' identifier (C(journalctl -t smt-ingest)), its record to the spool's
    C(status/last-ingest.json) and its metrics to C(metrics_dir).
  - Files that need an operator (no ESIID, rejected, too large, not a CSV) do not fail the
    module; they are listed in C(needs_operator).
"""

EXAMPLES = r"""
- name: Post everything not yet posted, settings from the droplet's env file
  smt_inline_post:
    env_file: /etc/default/intelliwatt-smt
    state_file: /home/deploy/smt_inbox/.posted_sha256

- name: Re-post one file for a given ESIID
  smt_inline_post:
    env_file: /etc/default/intelliwatt-smt
    paths: [/home/deploy/smt_inbox/upload_2025.csv]
    esiid_default: "10443720004529147"
    force: true
"""

RETURN = r"""
results:
  description: One entry per considered file.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: Path relative to the inbox.
      type: str
    outcome:
      description: >-
        C(posted), C(duplicate), C(would-post) (check mode), C(skipped-already-posted),
        C(skipped-rejected), C(skipped-too-large), C(skipped-not-csv), C(ignored),
        C(rejected), C(too-large), C(not-csv), C(failed-will-retry), C(no-esiid),
        C(waiting-for-app), C(skipped-waiting) or C(not-attempted).
      type: str
    sha256:
      description: sha256 of the file's bytes.
      type: str
    esiid:
      description: The ESIID used (or that would be).
      type: str
    meter:
      description: The meter used.
      type: str
    app_id:
      description: The web app's id for the stored file.
      type: str
    reason:
      description: >-
        The app's error code, the size comparison, or the failure; for a PGP delivery that could
        not be unpacked C(pgp:<code>: <reason>) (codes C(wrong_key), C(no_secret_key),
        C(corrupt_armor), C(not_a_zip), C(corrupt_zip), C(no_csv_inside), C(zip_too_large),
        C(decrypt_failed)).
      type: str
    member:
      description: For a PGP delivery, the zip entry that was posted; else null.
      type: str
    summary:
      description: >-
        The data summary of the CSV (layout, ESIIDs, first and last interval, intervals present
        and expected, gap days, estimated share, kWh total); null when not read.
      type: dict
    landing:
      description: >-
        For a posted file, what the app says it stored - C(verdict) (C(exact), C(short), C(none),
        C(mismatch), C(unverified)), C(file) and C(app) (intervals, first and last start in UTC,
        kWh; C(app) also the number of C(parts)), and C(detail) in words (e.g. which span is
        missing). Null for files not posted by this run.
      type: dict
    needs_operator:
      description: Whether the file waits for a person (see C(needs_operator) below).
      type: bool
  sample: [{"path": "IntervalMeterUsage_10443720000000099_20251101.csv", "outcome": "posted",
            "sha256": "9f2c...", "esiid": "10443720000000099", "meter": "M1", "app_id": "42",
            "reason": "", "size": 2612345}]
summary:
  description: Count of files per outcome.
  returned: always
  type: dict
  sample: {"posted": 2, "skipped-already-posted": 17}
exit_code:
  description: The pass's exit code (0 done, 1 left to retry, 2 configuration).
  returned: success
  type: int
needs_operator:
  description: The results of the files that need an operator decision.
  returned: success
  type: list
  elements: dict
left_to_retry:
  description: One line per thing the next pass retries (the sync, files).
  returned: success
  type: list
  elements: str
log:
  description: >-
    The package's log lines for this run (never the token); on failure only its warnings and
    errors (the whole log is in the journal).
  returned: always
  type: list
  elements: str
"""

import logging
import traceback
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import requests  # noqa: F401

    REQUESTS_ERROR = None
except ImportError:
    REQUESTS_ERROR = traceback.format_exc()

from ansible.module_utils.smt_droplet.ansible_support import pass_lock, run_module, trouble
from ansible.module_utils.smt_droplet.config import (
    ConfigError,
    PgpSettings,
    PostSettings,
    RecordSettings,
    check_state_dir,
)
from ansible.module_utils.smt_droplet.ingest import post_pending
from ansible.module_utils.smt_droplet.outcomes import RETRY_OUTCOMES, Outcome, PassResult
from ansible.module_utils.smt_droplet.passrecord import finish_pass

OPTION_ENV = {
    "base_url": "INTELLIWATT_BASE_URL",
    "admin_token": "ADMIN_TOKEN",
    "local_dir": "SMT_LOCAL_DIR",
    "state_file": "STATE_FILE",
    "source": "SOURCE_TAG",
    "esiid_default": "ESIID_DEFAULT",
    "meter_default": "METER_DEFAULT",
    "delivery": "SMT_DELIVERY",
    "encoding": "SMT_ENCODING",
    "max_body_bytes": "SMT_MAX_BODY_BYTES",
    "include": "SMT_INCLUDE",
    "retries": "SMT_POST_RETRIES",
    "http_timeout": "SMT_HTTP_TIMEOUT",
    "lock_wait": "SMT_LOCK_WAIT",
    "gnupg_home": "SMT_GNUPG_HOME",
    "spool_dir": "SMT_SPOOL_DIR",
    "metrics_dir": "SMT_METRICS_DIR",
}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "env_file": {"type": "path"},
            "base_url": {"type": "str"},
            "admin_token": {"type": "str", "no_log": True},
            "local_dir": {"type": "path"},
            "state_file": {"type": "path"},
            "source": {"type": "str"},
            "esiid_default": {"type": "str"},
            "meter_default": {"type": "str"},
            "delivery": {"type": "str", "choices": ["inline", "raw-upload"]},
            "encoding": {"type": "str", "choices": ["base64+gzip", "base64"]},
            "max_body_bytes": {"type": "int"},
            "include": {"type": "list", "elements": "str"},
            "paths": {"type": "list", "elements": "path"},
            "force": {"type": "bool", "default": False},
            "retries": {"type": "int"},
            "http_timeout": {"type": "float"},
            "lock_wait": {"type": "float"},
            "gnupg_home": {"type": "path"},
            "spool_dir": {"type": "path"},
            "metrics_dir": {"type": "path"},
            "sync_error": {"type": "str"},
            "fail_on_retry": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    if REQUESTS_ERROR is not None and not module.check_mode:
        module.fail_json(
            msg=missing_required_lib("requests") + " On Debian/Ubuntu: install python3-requests.",
            exception=REQUESTS_ERROR,
        )

    def post(env: dict[str, str]) -> PassResult:
        settings = PostSettings.from_env(env)
        pgp = PgpSettings.from_env(env)
        if settings.admin_token:
            module.no_log_values.add(settings.admin_token)  # also when it came from env_file
        paths = _existing_paths(module.params["paths"])
        if not module.check_mode:  # read-only in check mode: no lock, ledger, cache or HTTP
            check_state_dir(settings.state_file)
        result = PassResult(sync_error=module.params["sync_error"] or None)
        with pass_lock(settings.state_file, settings.lock_wait, module.check_mode):
            post_pending(
                settings,
                paths=paths or None,
                force=module.params["force"],
                check=module.check_mode,
                pgp=pgp,
                result=result,
                record_dir=RecordSettings.from_env(env).spool_dir,
            )
            if not module.check_mode:
                logging.getLogger("smt_droplet.ingest").info("%s", result.summary_line())
                finish_pass(RecordSettings.from_env(env), result, trigger="ansible")
        return result

    result, lines = run_module(module, OPTION_ENV, post)
    _report(module, result, lines)


def _existing_paths(given: list[str] | None) -> list[Path]:
    paths = [Path(p) for p in given or []]
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"paths: {path} is not a file")
    return paths


def _report(module: AnsibleModule, result: PassResult, lines: list[str]) -> None:
    """exit_json with per-file results, or fail_json naming what is left to retry."""
    changed_by = (Outcome.POSTED, Outcome.DUPLICATE, Outcome.WOULD_POST)
    out = {
        "changed": any(f.outcome in changed_by for f in result.files),
        "results": [f.to_dict() for f in result.files],
        "summary": result.counts(),
        "exit_code": int(result.exit_code),
        "needs_operator": [f.to_dict() for f in result.needing_operator()],
        "log": lines,
    }
    if result.fatal:
        out["log"] = trouble(lines)
        module.fail_json(msg=f"the web app stopped the pass: {result.fatal}", **out)
    left = [
        f"{f.path}: {f.outcome} {f.reason}".strip()
        for f in result.files
        if f.outcome in RETRY_OUTCOMES and f.outcome != Outcome.UNRECORDED
    ]
    if result.sync_error:
        left.insert(0, f"SFTP sync: {result.sync_error}")
    out["left_to_retry"] = left
    if result.exit_code != 0 and module.params["fail_on_retry"]:
        out["log"] = trouble(lines)  # the whole log is in the journal (smt-ingest)
        module.fail_json(msg="left to retry: " + "; ".join(left), **out)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
