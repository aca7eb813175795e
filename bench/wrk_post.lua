-- wrk script for bench/run.py: POST one JSON body (with an Authorization header when given)
-- and print the summary as one JSON line that bench/loadgen.py parses.
--
-- Environment: BENCH_BODY (the request body), BENCH_AUTHORIZATION (the header value, or empty).

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization ~= nil and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %.0f, "p90_us": %.0f, ' ..
    '"p99_us": %.0f, "mean_us": %.1f, "max_us": %.0f, "errors_connect": %d, ' ..
    '"errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status,
    e.timeout))
end
