#!/usr/bin/env python3
"""HTTP probe run inside the droplet container by the full-stack tests and the demo.

    probe.py get URL
    probe.py post URL [--header 'Name: value']... [--json TEXT] [--file PATH [--field NAME]]

Prints one JSON object: ``{"status": int, "body": str}`` (HTTP errors included; connection
errors exit 2). Stdlib only, like the rest of the test bed.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def _multipart(field: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + path.read_bytes() + tail, f"multipart/form-data; boundary={boundary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["get", "post"])
    parser.add_argument("url")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--json", help="JSON request body")
    parser.add_argument("--file", help="send this file as multipart/form-data")
    parser.add_argument("--field", default="file", help="multipart field name (default file)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--cacert", help="trust only this CA for https:// (the TLS front's)")
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    data = None
    if args.json is not None:
        data = args.json.encode()
        headers.setdefault("Content-Type", "application/json")
    elif args.file:
        data, headers["Content-Type"] = _multipart(args.field, Path(args.file))
    elif args.method == "post":
        data = b""
    if not args.url.startswith(("http://", "https://")):
        parser.error("only http:// and https:// URLs")
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        args.url, data=data, headers=headers, method=args.method.upper()
    )
    try:
        context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as response:  # noqa: S310 (scheme checked above)
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        print(json.dumps({"status": 0, "error": str(exc)}))
        return 2
    print(json.dumps({"status": status, "body": body.decode("utf-8", "replace")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
