-- The request path hands a job fal accepted over to the resolver, which settles the hold to
-- what fal produced or releases it if fal produced nothing. Its lease is made due at once.
--
--   'unresolved': the request path gave up on the job (its status or result could not be
--                 had, the client went away, the deadline passed) after telling fal to cancel
--                 it; the in-flight slot is freed, the client has its answer.
--   'detached':   fal's queue API answered the submit at once (SPEC section 11); the job is
--                 the key's in flight until fal finishes it, whether or not its client asks.
--
-- A hold the resolver released as abandoned meanwhile is put back first (reinstate.lua).
--
-- KEYS: 1 holds, 2 leases, 3 request record, 4 inflight, 5 budget, 6 ledger   (under {k:<id>})
-- ARGV: 1 request_id, 2 fal request id ('' = as recorded), 3 now_us ('' = Redis TIME),
--       4 'unresolved'|'detached', 5 key_id, 6 acting process id
-- Reply: 1 handed over, 2 handed over after putting it back, 0 no such hold (already resolved)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
local reply = 1
if not raw then
  reply = 2
  raw = reinstate_hold({holds = KEYS[1], record = KEYS[3], budget = KEYS[5],
    inflight = KEYS[4], leases = KEYS[2], ledger = KEYS[6]},
    ARGV[5], ARGV[1], ARGV[2], ARGV[6], 0, redis_now_us(ARGV[3]))
  if not raw then
    return 0
  end
end
local hold = cjson.decode(raw)
if ARGV[2] ~= '' then
  hold.upstream = ARGV[2]
end
local mode = ARGV[4]
if mode == 'detached' then
  hold.state = 'submitted'
  redis.call('HSET', KEYS[3], 'state', 'submitted', 'upstream', hold.upstream)
else
  hold.state = 'unresolved'
  redis.call('HSET', KEYS[3], 'status', 'unresolved', 'state', 'unresolved',
    'upstream', hold.upstream)
  redis.call('HDEL', KEYS[4], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
redis.call('ZADD', KEYS[2], fmt(ms_of(redis_now_us(ARGV[3]))), ARGV[1])
return reply
