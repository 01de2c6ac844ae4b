#!/bin/sh
# The old droplet's way of posting one file (docs/design.md, "Failures of the system this
# replaces"): plain base64, the JSON
# body built with jq (reading the content from stdin, not `--arg`, which broke on the 128 KiB
# argument limit) and sent with curl. The baseline for the "post the 12-month file" benchmark.
#
#   legacy_post.sh FILE ESIID     (INTELLIWATT_BASE_URL, ADMIN_TOKEN from the environment)
set -eu
file=$1
esiid=$2
base64 -w0 "$file" |
    jq -Rsc --arg filename "$(basename "$file")" --arg esiid "$esiid" \
        '{mode: "inline", source: "adhocusage", filename: $filename, mime: "text/csv",
          encoding: "base64", content_b64: ., esiid: $esiid, meter: "M1"}' |
    curl -sS -f -o /dev/null -H 'content-type: application/json' \
        -H "x-admin-token: $ADMIN_TOKEN" --data-binary @- \
        "$INTELLIWATT_BASE_URL/api/admin/smt/pull"
