-- The resolver claims a hold whose lease ran out (its request is no longer alive to renew
-- it, or gave it up), so that of several resolvers racing only one asks fal about it.
-- Resolving stays exactly-once without the claim: resolve.lua acts only while the hold exists.
--
-- KEYS: 1 holds, 2 leases   (under {k:<id>})
-- ARGV: 1 request_id, 2 claim ms (how long the claimer has before others may try),
--       3 '1' = claim a detached job (fal's queue API) even before its lease ran out
-- Reply: the hold's JSON when claimed, false otherwise (gone, or its lease not yet run out)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
local now = ms_of(redis_now_us(''))
local lease = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
local detached = ARGV[3] == '1' and cjson.decode(raw).state == 'submitted'
if lease and lease > now and not detached then
  return false
end
redis.call('ZADD', KEYS[2], fmt(now + tonumber(ARGV[2])), ARGV[1])
return raw
