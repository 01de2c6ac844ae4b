"""``GET /metrics`` of both servers, against the real servers on loopback: the counters move
with real requests, the text parses with prometheus_client's parser, and only a direct
loopback client (not one proxied by the TLS front) or the token holder may read them."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families
from test_upload import TOKEN, Box, csv_bytes, upload
from test_webhook import SECRET, Hook, trigger


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "service"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_webhook_metrics(tmp_path) -> None:
    hook = Hook(tmp_path)
    server = hook.start()
    try:
        assert trigger(server, {"reason": "x"}).status_code == 202
        assert (
            trigger(server, {"reason": "x"}, headers={"x-smt-secret": "wrong"}).status_code == 401
        )
        requests.get(server.url("/nosuch/path/1"), timeout=5)
        requests.get(server.url("/nosuch/path/2"), timeout=5)
        r = requests.get(server.url("/metrics"), timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        m = samples(r.text)
        key = (("route", "/trigger/smt-now"), ("status", "202"))
        assert m[("smt_http_requests_total", key)] == 1
        assert m[("smt_http_auth_rejected_total", ())] == 1
        assert m[("smt_http_requests_total", (("route", "other"), ("status", "404")))] == 2
        assert m[("smt_http_queue_depth", ())] == 1
        assert m[("smt_http_received_bytes_total", ())] > 0
        # Through the TLS front (it adds X-Forwarded-For): refused without the secret.
        proxied = {"X-Forwarded-For": "203.0.113.9"}
        assert requests.get(server.url("/metrics"), headers=proxied, timeout=5).status_code == 403
        with_secret = {**proxied, "x-smt-secret": SECRET}
        assert requests.get(server.url("/metrics"), headers=with_secret, timeout=5).ok
    finally:
        for s in hook.servers:
            s.ensure_stopped()


def test_upload_metrics_count_rate_limits_and_bad_tokens(tmp_path) -> None:
    box = Box(tmp_path, SMT_ADMIN_UPLOAD_DAILY_LIMIT="2")
    server = box.start()
    try:
        assert upload(server, csv_bytes(1)).status_code == 202
        assert upload(server, csv_bytes(2), token="nope").status_code == 401
        codes = [upload(server, csv_bytes(10 + i)).status_code for i in range(3)]
        assert codes == [202, 429, 429]
        m = samples(requests.get(server.url("/metrics"), timeout=5).text)
        assert m[("smt_http_auth_rejected_total", ())] == 1
        assert m[("smt_http_rate_limited_total", ())] == 2
        assert m[("smt_http_requests_total", (("route", "/upload"), ("status", "202")))] == 2
        assert m[("smt_http_requests_total", (("route", "/upload"), ("status", "429")))] == 2
        assert m[("smt_http_received_bytes_total", ())] >= len(csv_bytes(1))
        proxied = {"X-Forwarded-For": "203.0.113.9"}
        assert requests.get(server.url("/metrics"), headers=proxied, timeout=5).status_code == 403
        token = {**proxied, "x-smt-upload-token": TOKEN}
        assert requests.get(server.url("/metrics"), headers=token, timeout=5).ok
    finally:
        for s in box.servers:
            s.ensure_stopped()
