-- POST one fixed body to the URL given to wrk:
--   wrk --latency -s bench/post.lua URL -- BODY_FILE CONTENT_TYPE API_KEY
-- done() prints one line "BENCH_RESULT {json}" for bench/run.py; latencies are in microseconds.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

-- Runs in each thread before wrk formats its request once, so the body is read once per thread.
function init(args)
   local file = assert(io.open(args[1], "rb"))
   wrk.method = "POST"
   wrk.body = file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = args[2]
   wrk.headers["X-API-Key"] = args[3]
   non2xx = 0
   repeats = 0
end

-- wrk itself only counts statuses above 399 as errors; a 1xx or 3xx is a failure here too.
function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local non2xx, repeats = 0, 0
   for _, thread in ipairs(threads) do
      non2xx = non2xx + thread:get("non2xx")
      repeats = repeats + thread:get("repeats")
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
      '"status": %d, "timeout": %d, "non2xx": %d, "repeats": %d, "p50_us": %d, "p99_us": %d}\n',
      summary.requests, summary.duration, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout, non2xx, repeats, latency:percentile(50), latency:percentile(99)))
end
