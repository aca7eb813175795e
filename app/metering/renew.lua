-- Renew the leases of holds whose requests are still alive (one key's holds per call).
--
-- KEYS: 1 leases   (under {k:<id>})
-- ARGV: 1 lease ms, 2.. request ids
-- Reply: how many leases were renewed (a resolved hold has none left to renew)

local until_ms = fmt(ms_of(redis_now_us('')) + tonumber(ARGV[1]))
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', until_ms, ARGV[i])
end
return renewed
