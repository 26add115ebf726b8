-- Replays pre-signed requests from $BENCH_REQUESTS (one "signature<TAB>body" per line).
-- Each thread keeps every n-th line, so no two threads send the same event.
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local reqs = {}
local idx = 1
function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS"))
  local i = 0
  for line in io.lines(os.getenv("BENCH_REQUESTS")) do
    if i % nthreads == tid then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", "/webhooks/lacuna",
        {["x-lacuna-signature"] = sig, ["Content-Type"] = "application/json"}, body)
    end
    i = i + 1
  end
end

function request()
  local r = reqs[idx]
  idx = idx + 1
  if idx > #reqs then idx = 1 end
  return r
end

function done(summary, latency, requests)
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout))
end
