-- fal accepted the job: record its request id on the hold (state 'submitted') and on the
-- request record, so that whoever resolves the hold asks fal for the outcome. A hold the
-- resolver released as abandoned meanwhile is put back (reinstate.lua): its request is alive.
--
-- KEYS: 1 holds, 2 request record, 3 budget, 4 inflight, 5 leases, 6 ledger   (under {k:<id>})
-- ARGV: 1 request_id, 2 fal request id, 3 key_id, 4 acting process id, 5 hold lease ms,
--       6 now_us ('' = Redis TIME)
-- Reply: 1 recorded, 2 recorded on the reinstated hold, 0 no such hold (resolved otherwise)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
local reply = 1
if not raw then
  raw = reinstate_hold({holds = KEYS[1], record = KEYS[2], budget = KEYS[3],
    inflight = KEYS[4], leases = KEYS[5], ledger = KEYS[6]},
    ARGV[3], ARGV[1], ARGV[2], ARGV[4], tonumber(ARGV[5]), redis_now_us(ARGV[6]))
  if not raw then
    return 0
  end
  reply = 2
end
local hold = cjson.decode(raw)
hold.upstream = ARGV[2]
if hold.state == 'held' then
  hold.state = 'submitted'
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
redis.call('HSET', KEYS[2], 'upstream', ARGV[2], 'state', hold.state)
return reply
