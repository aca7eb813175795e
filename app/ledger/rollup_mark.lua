-- Fix where a key's rollups begin, before backfilling them from the raw ledger.
--
-- KEYS: 1 rollup state ({k:<id>}:rollup), 2 ledger stream   (same slot)
-- Reply: {since, backfilled ('1' or '')}
--
-- resolve.lua counts every entry from 'since' on (it sets 'since' to its first entry). If it
-- has not run yet, 'since' becomes the id just after the stream's last one: every entry
-- before it was written by code that kept no rollups, and is the backfill's to count.

local state, ledger = KEYS[1], KEYS[2]
local since = redis.call('HGET', state, 'since')
if not since then
  since = '0-1'
  if redis.call('EXISTS', ledger) == 1 then
    local info = redis.call('XINFO', 'STREAM', ledger)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
        since = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
      end
    end
  end
  redis.call('HSET', state, 'since', since)
end
return {since, redis.call('HGET', state, 'backfilled') or ''}
