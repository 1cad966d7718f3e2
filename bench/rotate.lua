-- POST the bodies of a file, one per line, each in turn, starting at line FIRST:
--   wrk --latency -s bench/rotate.lua URL -- BODIES_FILE CONTENT_TYPE API_KEY FIRST
-- Once past the last line it starts over, and counts each request sent again as a repeat.
-- Results are printed by post.lua's done().

dofile("bench/post.lua")

local bodies = {}
local index = 0

function init(args)
   for line in io.lines(args[1]) do
      table.insert(bodies, line)
   end
   index = tonumber(args[4]) - 1
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[2]
   wrk.headers["X-API-Key"] = args[3]
   non2xx = 0
   repeats = 0
end

function request()
   index = index + 1
   if index > #bodies then
      repeats = repeats + 1
   end
   return wrk.format(nil, nil, nil, bodies[(index - 1) % #bodies + 1])
end
