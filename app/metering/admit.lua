-- Admit one request: key check, rate limits, budget, then hold + in-flight slot + lease +
-- request record + ledger entry. Nothing is written unless every check passes, so a refused
-- request holds no money and uses no rate token.
--
-- KEYS: 1 meta, 2 gcra, 3 inflight, 4 budget, 5 holds, 6 ledger, 7 leases, 8 request record
--       (all under {k:<id>})
-- ARGV: 1 key_id, 2 request_id (gateway-generated), 3 now_us ('' = Redis TIME), 4 amount
--       (micro-dollars), 5 pixels, 6 unit_price, 7 model, 8 operation, 9 endpoint,
--       10 process_id, 11 default_rpm, 12 default_max_concurrent, 13 hold lease ms,
--       14 request record ttl ms, 15 prompt ('' = none)
--
-- Replies:
--   {'ok', remaining (-1 = unlimited), rpm, rl_remaining, rl_reset_s}
--   {'unauthorized', 'unknown'|'revoked'|'expired'}
--   {'rate', 'rpm'|'concurrency', retry_after_s, rpm, rl_remaining, rl_reset_s, limit}
--   {'budget', remaining, rpm, rl_remaining, rl_reset_s}
--   {'stale'}  this request id was already used (or given up on): nothing was done

local meta_key, gcra_key, inflight_key, budget_key, holds_key, ledger_key, leases_key,
  record_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local key_id, request_id = ARGV[1], ARGV[2]
local amount = tonumber(ARGV[4])
local process_id = ARGV[10]
local now_us = redis_now_us(ARGV[3])
local day_start, month_start = period_starts(now_us)

-- A request id is used once. Its record exists if it was admitted before, or if the gateway
-- released it before this script ran (it lost the reply of an earlier attempt to run it).
if redis.call('EXISTS', record_key) == 1 then
  return {'stale'}
end

local meta = redis.call('HMGET', meta_key,
  'status', 'expires_at', 'budget_micro', 'budget_period', 'rpm', 'max_concurrent')
if not meta[1] then
  return {'unauthorized', 'unknown'}
end
if meta[1] ~= 'active' then
  return {'unauthorized', 'revoked'}
end
local expires_at = tonumber(meta[2])
if expires_at and now_us >= expires_at * 1000000 then
  return {'unauthorized', 'expired'}
end

local rpm = tonumber(meta[5]) or tonumber(ARGV[11])
local max_concurrent = tonumber(meta[6]) or tonumber(ARGV[12])

-- Budget: settled spend of the key's current calendar period plus everything held.
local budget = tonumber(meta[3])
local spent_field = period_field(meta[4], day_start, month_start)
local function remaining_budget()
  if not budget then
    return -1
  end
  local state = redis.call('HMGET', budget_key, spent_field, 'held')
  local left = budget - (tonumber(state[1]) or 0) - (tonumber(state[2]) or 0)
  if left < 0 then
    left = 0
  end
  return left
end

-- GCRA: one emission interval per request, a burst of a whole minute's allowance; the
-- theoretical arrival time (TAT) never runs more than a minute ahead of now. TATs are stored
-- as whole microseconds; `slack` absorbs that rounding (at most half a microsecond a request).
local WINDOW = 60000000
local tat = nil
local new_tat = nil
local rl_remaining, rl_reset = 0, 0
local interval, slack = 0, 0
if rpm > 0 then
  interval = WINDOW / rpm
  slack = math.min(rpm, math.floor(interval / 2))
  tat = tonumber(redis.call('GET', gcra_key)) or now_us
  if tat < now_us then
    tat = now_us
  end
end

local function rate_state(at)
  -- Remaining requests, and seconds until one more is allowed (0 at the full allowance). On
  -- a refusal that is exactly Retry-After: both headers tell the same time.
  local ahead = at - now_us
  local left = math.floor((WINDOW + slack - ahead) / interval)
  if left < 0 then
    left = 0
  end
  local reset = 0
  if ahead > 0 then
    reset = math.max(0, math.ceil((ahead - (WINDOW + slack - (left + 1) * interval)) / 1000000))
  end
  return left, reset
end

if max_concurrent > 0 and redis.call('HLEN', inflight_key) >= max_concurrent then
  if rpm > 0 then
    rl_remaining, rl_reset = rate_state(tat)
  end
  return {'rate', 'concurrency', 1, rpm, rl_remaining, rl_reset, max_concurrent}
end

if rpm > 0 then
  local candidate = tat + interval
  local over = candidate - now_us - WINDOW - slack
  if over > 0 then
    local retry_after = math.max(1, math.ceil(over / 1000000))
    return {'rate', 'rpm', retry_after, rpm, 0, retry_after, rpm}
  end
  new_tat = math.floor(candidate + 0.5)
  rl_remaining, rl_reset = rate_state(new_tat)
end

local remaining = remaining_budget()
if budget then
  if amount > remaining then
    if rpm > 0 then
      rl_remaining, rl_reset = rate_state(tat)
    end
    return {'budget', remaining, rpm, rl_remaining, rl_reset}
  end
  remaining = remaining - amount
end

-- Every check passed: commit.
if new_tat then
  redis.call('SET', gcra_key, fmt(new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1000)
end
local now_ms = ms_of(now_us)
redis.call('HSET', inflight_key, request_id, process_id)
redis.call('HINCRBY', budget_key, 'held', amount)
-- Every value a string: cjson would print large numbers in exponent form.
redis.call('HSET', holds_key, request_id, cjson.encode({
  amount = ARGV[4], pixels = ARGV[5], unit_price = ARGV[6],
  model = ARGV[7], operation = ARGV[8], endpoint = ARGV[9],
  process = process_id, day = fmt(day_start), month = fmt(month_start),
  created_ms = fmt(now_ms), upstream = '', state = 'held',
}))
redis.call('ZADD', leases_key, fmt(now_ms + tonumber(ARGV[13])), request_id)
redis.call('HSET', record_key, 'status', 'pending', 'state', 'held', 'key_id', key_id,
  'operation', ARGV[8], 'model', ARGV[7], 'endpoint', ARGV[9], 'hold_micro', ARGV[4],
  'created_ms', fmt(now_ms), 'upstream', '', 'prompt', ARGV[15])
redis.call('PEXPIRE', record_key, ARGV[14])
redis.call('XADD', ledger_key, '*',
  'event', 'hold', 'key_id', key_id, 'request_id', request_id, 'upstream_request_id', '',
  'model', ARGV[7], 'operation', ARGV[8], 'pixels', ARGV[5], 'amount_micro', ARGV[4],
  'ts_ms', fmt(now_ms), 'process_id', process_id)
return {'ok', remaining, rpm, rl_remaining, rl_reset}
