-- The drainer's lease (one active drainer across every process): take, renew or give up.
--
-- KEYS: 1 the lease key
-- ARGV: 1 'take'|'renew'|'release', 2 this holder's token, 3 lease in ms
-- Reply: 1 when this holder holds (or, for release, held) the lease, else 0.

local key, mode, token = KEYS[1], ARGV[1], ARGV[2]
local holder = redis.call('GET', key)
if mode == 'take' then
  if holder == false or holder == token then
    redis.call('SET', key, token, 'PX', tonumber(ARGV[3]))
    return 1
  end
  return 0
end
if holder ~= token then
  return 0
end
if mode == 'renew' then
  redis.call('PEXPIRE', key, tonumber(ARGV[3]))
else
  redis.call('DEL', key)
end
return 1
