-- Sends the pre-signed requests of $BENCH_REQUESTS.<thread>.http (bench.make_requests: each
-- thread its own share of the events, each request after its length in 8 digits), read one
-- at a time and from the start again at the end.
--
-- Not loaded into a table in init(): wrk runs each thread's init() and starts that thread
-- before it runs the next one's, and its clock starts only once every thread runs. Loading
-- 200,000 requests took several seconds a thread, so the first thread sent tens of thousands
-- of requests before the clock started, counted in the total but not in the duration (the
-- req/s printed were 30-45 % too high, for the bare endpoint and `serve` alike), while the
-- next thread's loading took one of the two cores. Reading a request costs wrk about a
-- microsecond.
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local file
function init(args)
  file = assert(io.open(os.getenv("BENCH_REQUESTS") .. "." .. tid .. ".http", "rb"))
end

function request()
  local size = file:read(8)
  if size == nil then
    file:seek("set", 0)
    size = file:read(8)
  end
  return file:read(tonumber(size))
end

function done(summary, latency, requests)
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout))
end
