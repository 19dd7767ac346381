-- wrk script for `make bench`: POST /v1/chat/completions with a ~1 KB JSON body.
-- Environment: BENCH_KEY (bearer token), BENCH_STREAM=1 for "stream": true,
-- BENCH_MODEL (default gpt-4o-mini), BENCH_BODY_BYTES (default 1024).
-- done() prints one line "BENCHJSON {...}" with the figures bench.py reads.

local key = os.getenv("BENCH_KEY") or "sk-bench"
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "gpt-4o-mini"
local target = tonumber(os.getenv("BENCH_BODY_BYTES") or "1024")

local function make_body()
  local head = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"'
  local tail = '"}],"temperature":0.2,"max_tokens":64,"stream":' .. (stream and "true" or "false") .. '}'
  local words = "The quick brown fox jumps over the lazy dog while the router picks a credential. "
  local pad = ""
  while #head + #pad + #tail < target do
    pad = pad .. words
  end
  pad = string.sub(pad, 1, math.max(0, target - #head - #tail))
  return head .. pad .. tail
end

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = make_body()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"body_bytes":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max, #wrk.body))
end
