-- wrk script: POST a trigger with the secret header named by BENCH_HEADER (value BENCH_SECRET)
-- and print one JSON line with the numbers bench.py reads.
wrk.method = "POST"
wrk.body = '{"reason":"bench"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers[os.getenv("BENCH_HEADER") or "x-intelliwatt-secret"] = os.getenv("BENCH_SECRET") or ""

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
        '"write":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
        summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
        latency.mean))
end
