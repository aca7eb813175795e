-- Resolve a hold exactly once: settle it (charge min(actual, hold), release the rest) or
-- release it whole. Whoever finds the hold first wins; a later call (the request path racing a
-- sweeper, or a retried call) finds it gone and gets the recorded outcome back instead.
--
-- KEYS: 1 meta, 2 inflight, 3 budget, 4 holds, 5 ledger   (all under {k:<id>})
-- ARGV: 1 key_id, 2 request_id, 3 now_us ('' = Redis TIME), 4 'settle'|'release',
--       5 actual amount ('' = the hold amount), 6 actual pixels ('' = the hold's pixels),
--       7 reason, 8 day_start, 9 month_start (of now, epoch s), 10 acting process id
--
-- Replies:
--   {'ok', charged, released, remaining (-1 = unlimited), already (0 = resolved now,
--    1 = resolved earlier: charged/released are what was recorded then)}
--   {'missing', remaining}  no such hold, and no trace of it in the recent ledger

local meta_key, inflight_key, budget_key, holds_key, ledger_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local key_id, request_id, mode = ARGV[1], ARGV[2], ARGV[4]

local now_us = tonumber(ARGV[3])
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function remaining_budget()
  local meta = redis.call('HMGET', meta_key, 'budget_micro', 'budget_period')
  local budget = tonumber(meta[1])
  if not budget then
    return -1
  end
  local field = 'total'
  if meta[2] == 'daily' then
    field = 'd:' .. ARGV[8]
  elseif meta[2] == 'monthly' then
    field = 'm:' .. ARGV[9]
  end
  local state = redis.call('HMGET', budget_key, field, 'held')
  local left = budget - (tonumber(state[1]) or 0) - (tonumber(state[2]) or 0)
  if left < 0 then
    left = 0
  end
  return left
end

local raw = redis.call('HGET', holds_key, request_id)
if not raw then
  -- Look for how it was resolved among the newest ledger entries.
  local entries = redis.call('XREVRANGE', ledger_key, '+', '-', 'COUNT', 500)
  for _, entry in ipairs(entries) do
    local f = {}
    local kv = entry[2]
    for i = 1, #kv, 2 do
      f[kv[i]] = kv[i + 1]
    end
    if f.request_id == request_id then
      if f.event == 'settle' then
        return {'ok', tonumber(f.amount_micro), tonumber(f.released_micro) or 0,
          remaining_budget(), 1}
      elseif f.event == 'release' then
        return {'ok', 0, tonumber(f.amount_micro), remaining_budget(), 1}
      end
    end
  end
  return {'missing', remaining_budget()}
end

local hold = cjson.decode(raw)
local held = tonumber(hold.amount)
local charged = 0
local pixels = hold.pixels
if mode == 'settle' then
  charged = tonumber(ARGV[5]) or held
  if charged > held then
    charged = held
  end
  if charged < 0 then
    charged = 0
  end
  if ARGV[6] ~= '' then
    pixels = ARGV[6]
  end
end
local released = held - charged

redis.call('HDEL', holds_key, request_id)
redis.call('HDEL', inflight_key, request_id)
redis.call('HINCRBY', budget_key, 'held', -held)
if charged > 0 then
  -- Charged to the periods the hold was placed in: a hold placed at 23:59 belongs to that day.
  redis.call('HINCRBY', budget_key, 'total', charged)
  redis.call('HINCRBY', budget_key, 'd:' .. hold.day, charged)
  redis.call('HINCRBY', budget_key, 'm:' .. hold.month, charged)
end

-- Drop per-day/month counters older than ~400 days once there are many; the ledger keeps all.
if redis.call('HLEN', budget_key) > 64 then
  local cutoff = tonumber(ARGV[8]) - 400 * 86400
  for _, name in ipairs(redis.call('HKEYS', budget_key)) do
    local start = tonumber(string.sub(name, 3))
    if start and start < cutoff then
      redis.call('HDEL', budget_key, name)
    end
  end
end

local entry = {'event', mode, 'key_id', key_id, 'request_id', request_id,
  'upstream_request_id', hold.upstream or '', 'model', hold.model,
  'operation', hold.operation, 'pixels', pixels}
if mode == 'settle' then
  table.insert(entry, 'amount_micro')
  table.insert(entry, string.format('%d', charged))
  table.insert(entry, 'released_micro')
  table.insert(entry, string.format('%d', released))
else
  table.insert(entry, 'amount_micro')
  table.insert(entry, string.format('%d', released))
end
table.insert(entry, 'hold_micro')
table.insert(entry, hold.amount)
table.insert(entry, 'reason')
table.insert(entry, ARGV[7])
table.insert(entry, 'ts_ms')
table.insert(entry, string.format('%.0f', math.floor(now_us / 1000)))
table.insert(entry, 'process_id')
table.insert(entry, ARGV[10])
redis.call('XADD', ledger_key, '*', unpack(entry))
return {'ok', charged, released, remaining_budget(), 0}
