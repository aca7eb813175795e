-- fal accepted the job: record its request id on the hold (state 'submitted') and on the
-- request record, so that whoever resolves the hold asks fal for the outcome.
--
-- KEYS: 1 holds, 2 request record   (under {k:<id>})
-- ARGV: 1 request_id, 2 fal request id
-- Reply: 1 recorded, 0 no such hold (already resolved, e.g. released by the resolver)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return 0
end
local hold = cjson.decode(raw)
hold.upstream = ARGV[2]
if hold.state == 'held' then
  hold.state = 'submitted'
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
redis.call('HSET', KEYS[2], 'upstream', ARGV[2], 'state', hold.state)
return 1
