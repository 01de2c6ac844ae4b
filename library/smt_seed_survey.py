#!/usr/bin/python
"""Ansible module: what a hand-built seed droplet runs (thin wrapper of smt_droplet.takeover)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smt_seed_survey
short_description: Survey a hand-built SMT droplet before playbooks/migrate.yml takes it over
description:
  - Lists the droplet's unit files that Ansible did not write (no C(Ansible managed) header), with
    their enabled/active state and the seed's known faults.
  - Lists the processes listening on O(ports); one outside any systemd service was started by
    hand (C(nohup)) and is reported with its PID.
  - Reads the seed's environment file leniently (quotes, C(export) lines, CRLF) and compares it
    key by key with O(expected); a secret that differs is named, never shown.
  - Changes nothing; safe in check mode.
version_added: "0.1.0"
author: IntelliWatt droplet team
options:
  env_file:
    description: The seed's environment file.
    type: path
    default: /etc/default/intelliwatt-smt
  expected:
    description:
      - Setting name to the value the inventory gives (empty values are not compared). Shown in
        the task's result; put secrets in O(expected_secrets).
    type: dict
    default: {}
  expected_secrets:
    description:
      - Like O(expected), for the settings that hold secrets (C(ADMIN_TOKEN)); never logged, and
        a difference is named, not shown.
    type: dict
    default: {}
  ports:
    description: TCP ports the seed's servers listened on.
    type: list
    elements: int
    default: [8080, 8787]
  adopt:
    description:
      - Also return C(settings), the seed values of the O(expected) names that differ, which may
        hold secrets; register the result with C(no_log).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Survey the seed droplet
  smt_seed_survey:
    expected:
      SMT_HOST: "{{ smt_ingest_sftp_host }}"
  register: seed
"""

RETURN = r"""
units:
  description: Unit files not written by Ansible (unit, path, enabled, active, faults).
  returned: always
  type: list
  elements: dict
listeners:
  description: Processes on O(ports) (port, pid, command, unit; unit null when started by hand).
  returned: always
  type: list
  elements: dict
hand_started:
  description: The listeners outside any systemd service.
  returned: always
  type: list
  elements: dict
env_found:
  description: Whether the environment file exists.
  returned: always
  type: bool
differences:
  description: Settings the box sets to another value than the inventory (key, box, inventory).
  returned: always
  type: list
  elements: dict
settings:
  description: The seed's values of the differing settings (only with O(adopt)).
  returned: when adopt
  type: dict
"""

from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.smt_droplet.takeover import survey


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "env_file": {"type": "path", "default": "/etc/default/intelliwatt-smt"},
            "expected": {"type": "dict", "default": {}},
            "expected_secrets": {"type": "dict", "default": {}, "no_log": True},
            "ports": {"type": "list", "elements": "int", "default": [8080, 8787]},
            "adopt": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    systemctl = module.get_bin_path("systemctl")

    def unit_state(unit: str) -> tuple[bool, bool]:
        if systemctl is None:
            return False, False
        enabled = module.run_command([systemctl, "is-enabled", unit])[0] == 0
        active = module.run_command([systemctl, "is-active", unit])[0] == 0
        return enabled, active

    given = {**module.params["expected"], **module.params["expected_secrets"]}
    expected = {k: "" if v is None else str(v) for k, v in given.items()}
    found, seed = survey(
        env_file=Path(module.params["env_file"]),
        expected=expected,
        ports=module.params["ports"],
        unit_state=unit_state,
    )
    result: dict[str, Any] = {"changed": False, **found.to_dict()}
    if module.params["adopt"]:
        result["settings"] = {d["key"]: seed[d["key"]] for d in found.differences}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
