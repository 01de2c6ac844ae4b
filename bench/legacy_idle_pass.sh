#!/bin/sh
# The old droplet's ingest pass, rebuilt from docs/design.md ("Failures of the system this
# replaces"): re-download
# the whole SFTP drop with OpenSSH's `sftp mget -p -r`, then `sha256sum` every file and grep the
# state file for its digest; only a digest not found there would be posted (curl). The baseline
# for the idle-pass benchmark, where nothing is new, so nothing reaches the curl step.
#
# Settings come from the environment, like the old script's EnvironmentFile:
#   SMT_HOST SMT_PORT SMT_USER SMT_KEY SMT_KNOWN_HOSTS SMT_REMOTE_DIR SMT_LOCAL_DIR STATE_FILE
set -eu

sftp -q -b - -i "$SMT_KEY" -P "$SMT_PORT" \
    -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$SMT_KNOWN_HOSTS" \
    "$SMT_USER@$SMT_HOST" >/dev/null <<EOF
lcd $SMT_LOCAL_DIR
mget -p -r $SMT_REMOTE_DIR/*
EOF

touch "$STATE_FILE"
new=0
for f in "$SMT_LOCAL_DIR"/*.csv; do
    [ -f "$f" ] || continue
    sha=$(sha256sum "$f" | cut -d' ' -f1)
    if grep -q "^$sha\$" "$STATE_FILE"; then
        continue
    fi
    # the old script built the JSON body here and POSTed it with curl
    new=$((new + 1))
done
echo "legacy pass: $new new file(s)"
