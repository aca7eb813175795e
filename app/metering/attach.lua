-- Record fal's request id on a hold, so a sweeper can ask fal what became of it after a crash.
--
-- KEYS: 1 holds (under {k:<id>})
-- ARGV: 1 request_id, 2 fal request id
-- Reply: 1 recorded, 0 no such hold (already resolved, e.g. by a sweeper)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return 0
end
local hold = cjson.decode(raw)
hold.upstream = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
return 1
