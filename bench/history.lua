-- wrk script for the history scenario (bench/run.sh prepends the table
-- `convs` = { {id=, lo=, hi=, tok=}, ... }: a conversation, its message id
-- range and a participant's token). WRK_MODE=latest asks the latest page,
-- WRK_MODE=deep a page before a random id of the conversation (a deep
-- before= cursor). Prints one line "WRKJSON {...}" at the end.

local mode = os.getenv("WRK_MODE") or "latest"
local counter = 0

function setup(thread)
	counter = counter + 1
	thread:set("tid", counter)
end

function init(args)
	math.randomseed(os.time() * 100 + (tid or 0))
	non200 = 0
end

function request()
	local c = convs[math.random(#convs)]
	local path = "/api/conversations/" .. c.id .. "/messages?limit=50"
	if mode == "deep" and c.hi > c.lo then
		path = path .. "&before=" .. math.random(c.lo + 1, c.hi)
	end
	return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. c.tok })
end

function done(summary, latency, requests)
	local e = summary.errors
	io.write(string.format("WRKJSON {\"mode\":\"%s\",\"requests\":%d," ..
	    "\"duration_us\":%d,\"bytes\":%d,\"errors\":{\"connect\":%d," ..
	    "\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
	    "\"latency_us\":{\"mean\":%.1f,\"p50\":%d,\"p90\":%d,\"p99\":%d," ..
	    "\"p999\":%d,\"max\":%d}}\n", mode, summary.requests,
	    summary.duration, summary.bytes, e.connect, e.read, e.write,
	    e.status, e.timeout, latency.mean, latency:percentile(50),
	    latency:percentile(90), latency:percentile(99),
	    latency:percentile(99.9), latency.max))
end
