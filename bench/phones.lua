-- POST one fixed body, as PHONES phones behind a platform's router (one X-Forwarded-For each, in turn):
--   wrk --latency -s bench/phones.lua URL -- BODY_FILE CONTENT_TYPE API_KEY PHONES
-- So per-phone counters (rate limits) stay as small as real ones. Results as post.lua prints them.

dofile("bench/post.lua")

local post_init = init
local phones = 1
local phone = 0

function init(args)
   post_init(args)
   phones = tonumber(args[4])
end

function request()
   phone = phone % phones + 1
   local high, low = math.floor(phone / 256), phone % 256
   wrk.headers["X-Forwarded-For"] = string.format("10.0.%d.%d", high % 256, low)
   return wrk.format()
end
