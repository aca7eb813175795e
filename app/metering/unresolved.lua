-- The request path gave up on a job fal had accepted (its status or result could not be had,
-- the client went away, the deadline passed): fal has been told to cancel, and the hold is
-- left to the resolver, which settles it to what fal produced or releases it if fal produced
-- nothing. The in-flight slot is freed: the client has its answer.
--
-- KEYS: 1 holds, 2 leases, 3 request record, 4 inflight   (under {k:<id>})
-- ARGV: 1 request_id, 2 fal request id ('' = as recorded), 3 now_us ('' = Redis TIME)
-- Reply: 1 marked, 0 no such hold (already resolved)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return 0
end
local hold = cjson.decode(raw)
if ARGV[2] ~= '' then
  hold.upstream = ARGV[2]
end
hold.state = 'unresolved'
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
-- Due now: the resolver takes it on its next pass.
redis.call('ZADD', KEYS[2], fmt(ms_of(redis_now_us(ARGV[3]))), ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'unresolved', 'state', 'unresolved',
  'upstream', hold.upstream)
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
