-- Resolve a hold exactly once: settle it (charge min(actual, hold), release the rest) or
-- release it whole. Whoever finds the hold first wins; a later call (the request path racing
-- the resolver, or a retried call) finds it gone and gets the recorded outcome back from the
-- request record instead; except that a settle of a hold released as 'abandoned' puts it back
-- first (reinstate.lua): fal did the work.
--
-- KEYS: 1 meta, 2 inflight, 3 budget, 4 holds, 5 ledger, 6 leases, 7 request record,
--       8 rollup state, 9 rollup month prefix (all under {k:<id>}; the month hash is
--       KEYS[9] .. 'YYYY-MM' of Redis's clock, so it shares the key's slot)
-- ARGV: 1 key_id, 2 request_id, 3 now_us ('' = Redis TIME), 4 'settle'|'release',
--       5 actual amount ('' = the hold amount), 6 actual pixels ('' = the hold's pixels),
--       7 reason, 8 acting process id, 9 images JSON ('' = none), 10 seed ('' = none),
--       11 request record ttl ms, 12 outcome of a release: 'failed'|'cancelled',
--       13 fal's request id ('' = as recorded on the hold; given when the attach write failed)
--
-- Replies:
--   {'ok', charged, released, remaining (-1 = unlimited), already (0 = resolved now,
--    1 = resolved earlier: charged/released are what was recorded then),
--    reinstated (1 = the settle put an abandoned hold back first, else 0)}
--   {'missing', remaining}  no such hold was ever admitted; a release leaves a tombstone so
--                           that an admission still on its way for this id is refused
--   {'kept', remaining}     a release as 'abandoned' of a hold that has fal's id by now: not
--                           done (the resolver's view was stale)

local meta_key, inflight_key, budget_key, holds_key, ledger_key, leases_key, record_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local key_id, request_id, mode = ARGV[1], ARGV[2], ARGV[4]
local now_us = redis_now_us(ARGV[3])
local now_ms = ms_of(now_us)

local function remaining_budget()
  local meta = redis.call('HMGET', meta_key, 'budget_micro', 'budget_period')
  local budget = tonumber(meta[1])
  if not budget then
    return -1
  end
  local day_start, month_start = period_starts(now_us)
  local state = redis.call('HMGET', budget_key, period_field(meta[2], day_start, month_start),
    'held')
  local left = budget - (tonumber(state[1]) or 0) - (tonumber(state[2]) or 0)
  if left < 0 then
    left = 0
  end
  return left
end

local raw = redis.call('HGET', holds_key, request_id)
local reinstated = 0
if not raw and mode == 'settle' then
  -- fal produced the images of a request the resolver gave up for dead (reinstate.lua).
  raw = reinstate_hold({holds = holds_key, record = record_key, budget = budget_key,
    inflight = inflight_key, leases = leases_key, ledger = ledger_key},
    key_id, request_id, ARGV[13] or '', ARGV[8], 0, now_us)
  reinstated = raw and 1 or 0
end
if not raw then
  redis.call('ZREM', leases_key, request_id)
  local rec = redis.call('HMGET', record_key, 'status', 'charged_micro', 'released_micro')
  if rec[1] == 'completed' or rec[1] == 'failed' or rec[1] == 'cancelled' then
    return {'ok', tonumber(rec[2]) or 0, tonumber(rec[3]) or 0, remaining_budget(), 1, 0}
  end
  if mode == 'release' and not rec[1] then
    redis.call('HSET', record_key, 'status', 'failed', 'state', 'released', 'key_id', key_id,
      'reason', ARGV[7], 'charged_micro', '0', 'released_micro', '0',
      'created_ms', fmt(now_ms), 'resolved_ms', fmt(now_ms))
    redis.call('PEXPIRE', record_key, ARGV[11])
  end
  return {'missing', remaining_budget()}
end

local hold = cjson.decode(raw)
if mode == 'release' and ARGV[7] == 'abandoned' and (hold.upstream or '') ~= '' then
  -- fal's id was recorded after the resolver claimed the hold: fal has the job, so it is not
  -- abandoned. Kept; the resolver asks fal about it once its claim runs out.
  return {'kept', remaining_budget()}
end
if ARGV[13] and ARGV[13] ~= '' then
  hold.upstream = ARGV[13]
end
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
redis.call('ZREM', leases_key, request_id)
redis.call('HINCRBY', budget_key, 'held', -held)
if charged > 0 then
  -- Charged to the periods the hold was placed in: a hold placed at 23:59 belongs to that day.
  redis.call('HINCRBY', budget_key, 'total', charged)
  redis.call('HINCRBY', budget_key, 'd:' .. hold.day, charged)
  redis.call('HINCRBY', budget_key, 'm:' .. hold.month, charged)
end

-- Drop per-day/month counters older than ~400 days once there are many; the ledger keeps all.
if redis.call('HLEN', budget_key) > 64 then
  local cutoff = math.floor(now_us / 1000000) - 400 * 86400
  for _, name in ipairs(redis.call('HKEYS', budget_key)) do
    local start = tonumber(string.sub(name, 3))
    if start and start < cutoff then
      redis.call('HDEL', budget_key, name)
    end
  end
end

local remaining = remaining_budget()
local status = 'completed'
if mode ~= 'settle' then
  status = ARGV[12]
  if status ~= 'cancelled' then
    status = 'failed'
  end
end
redis.call('HSET', record_key, 'status', status, 'state', mode == 'settle' and 'settled'
  or 'released', 'upstream', hold.upstream or '', 'charged_micro', string.format('%d', charged),
  'released_micro', string.format('%d', released), 'pixels', pixels, 'reason', ARGV[7],
  'images', ARGV[9], 'seed', ARGV[10], 'remaining_micro', string.format('%d', remaining),
  'resolved_ms', fmt(now_ms))
if mode ~= 'settle' and ARGV[7] == 'abandoned' then
  redis.call('HSET', record_key, ABANDONED_HOLD, raw)  -- kept in case it is alive after all
end
redis.call('PEXPIRE', record_key, ARGV[11])

local images = 0
if mode == 'settle' and ARGV[9] ~= '' then
  images = #cjson.decode(ARGV[9])
end
local entry = {'event', mode, 'key_id', key_id, 'request_id', request_id,
  'upstream_request_id', hold.upstream or '', 'model', hold.model,
  'operation', hold.operation, 'pixels', pixels}
if mode == 'settle' then
  table.insert(entry, 'amount_micro')
  table.insert(entry, string.format('%d', charged))
  table.insert(entry, 'released_micro')
  table.insert(entry, string.format('%d', released))
  table.insert(entry, 'images')
  table.insert(entry, string.format('%d', images))
else
  table.insert(entry, 'amount_micro')
  table.insert(entry, string.format('%d', released))
end
table.insert(entry, 'hold_micro')
table.insert(entry, hold.amount)
table.insert(entry, 'reason')
table.insert(entry, ARGV[7])
table.insert(entry, 'ts_ms')
table.insert(entry, fmt(now_ms))
table.insert(entry, 'process_id')
table.insert(entry, ARGV[8])
local entry_id = redis.call('XADD', ledger_key, '*', unpack(entry))

-- Rollups (what usage reports read), per UTC month: '<YYYY-MM>' by day x model x operation,
-- '<YYYY-MM>:d' by day, '<YYYY-MM>:m' by model x operation for the whole month. 'since' is
-- the first ledger entry counted here; the one-time backfill counts those before it.
local days = math.floor(now_us / 86400000000)
local year, month = civil_from_days(days)
local day = days - days_from_civil(year, month, 1) + 1
local month_name = string.format('%04d-%02d', year, month)
local day_name = string.format('%s-%02d', month_name, day)
local by_model = hold.model .. '|' .. hold.operation .. '|'
local rollups = {
  {KEYS[9] .. month_name, day_name .. '|' .. by_model},
  {KEYS[9] .. month_name .. ':d', day_name .. '|'},
  {KEYS[9] .. month_name .. ':m', by_model},
}
for _, target in ipairs(rollups) do
  local key, group = target[1], target[2]
  if mode == 'settle' then
    redis.call('HINCRBY', key, group .. 'requests', 1)
    redis.call('HINCRBY', key, group .. 'images', images)
    redis.call('HINCRBY', key, group .. 'pixels', pixels)
    redis.call('HINCRBY', key, group .. 'micro', charged)
  else
    redis.call('HINCRBY', key, group .. 'released', 1)
  end
end
redis.call('HSETNX', KEYS[8], 'since', entry_id)
local first = redis.call('HGET', KEYS[8], 'first')
if not first or month_name < first then
  redis.call('HSET', KEYS[8], 'first', month_name)
end
return {'ok', charged, released, remaining, 0, reinstated}
