"""Bench item 1's pure-paramiko baseline: one file by ``SFTPClient.get`` with paramiko's own
defaults (its cipher order, 2 MiB window, prefetch), as a script written against paramiko's
documentation would fetch it. Shows what the mirror's own code adds or costs on top of the
same library.

    python paramiko_get.py HOST PORT USER KEY KNOWN_HOSTS REMOTE LOCAL
"""

from __future__ import annotations

import sys

import paramiko


def main(argv: list[str]) -> int:
    if len(argv) != 7:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    host, port, user, key, known_hosts, remote, local = argv
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, int(port), user, key_filename=key, look_for_keys=False, allow_agent=False)
    try:
        with client.open_sftp() as sftp:
            sftp.get(remote, local)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
