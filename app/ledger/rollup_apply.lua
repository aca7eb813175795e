-- Add a key's backfilled rollups once: totals of the ledger entries before 'since'.
--
-- KEYS: 1 rollup state ({k:<id>}:rollup), 2 rollup month prefix ({k:<id>}:rollup:)
-- ARGV: 1 the 'since' the totals were computed for, then triplets: hash suffix
--       ('YYYY-MM', 'YYYY-MM:d' or 'YYYY-MM:m', as resolve.lua keeps them), field, value
-- Reply: 1 applied now, 0 already applied (or 'since' moved: recompute)

local state, prefix = KEYS[1], KEYS[2]
if redis.call('HGET', state, 'backfilled') == '1' then
  return 0
end
if redis.call('HGET', state, 'since') ~= ARGV[1] then
  return 0
end
local first = redis.call('HGET', state, 'first')
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', prefix .. ARGV[i], ARGV[i + 1], ARGV[i + 2])
  local month = string.sub(ARGV[i], 1, 7)
  if not first or month < first then
    first = month
  end
end
if first then
  redis.call('HSET', state, 'first', first)
end
redis.call('HSET', state, 'backfilled', '1')
return 1
