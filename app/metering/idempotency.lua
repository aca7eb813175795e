-- Idempotency records (Stripe semantics), one hash per (API key, Idempotency-Key):
--   state ('in_progress'|'done'), fingerprint (sha256 of method, path, body), request_id and
--   process of the first request, created_ms, and once done: status, body (base64), headers.
--
-- KEYS: 1 the record ({k:<id>}:idem:<sha256 of the Idempotency-Key>)
-- ARGV: 1 op, then per op:
--   begin    2 fingerprint, 3 request_id, 4 process, 5 in-progress ttl ms, 6 owner to take over
--            from ('' = none)
--            -> {'new'} | {'conflict'} | {'done', status, body, headers}
--               | {'in_progress', owner request_id, owner process, age_ms}
--   complete 2 request_id, 3 status, 4 body, 5 headers, 6 ttl ms   -> 1 stored | 0 not the owner
--   abandon  2 request_id                                          -> 1 freed  | 0 not the owner

local key, op = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function start(fingerprint, request_id, process, ttl)
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'in_progress', 'fingerprint', fingerprint,
    'request_id', request_id, 'process', process, 'created_ms', string.format('%.0f', now))
  redis.call('PEXPIRE', key, ttl)
  return {'new'}
end

if op == 'begin' then
  local rec = redis.call('HMGET', key, 'state', 'fingerprint', 'request_id', 'process',
    'created_ms', 'status', 'body', 'headers')
  if not rec[1] then
    return start(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
  end
  if rec[2] ~= ARGV[2] then
    return {'conflict'}
  end
  if rec[1] == 'done' then
    return {'done', rec[6], rec[7], rec[8]}
  end
  if rec[3] == ARGV[3] then
    return {'new'}  -- our own record: a retried call (e.g. after a socket timeout)
  end
  if ARGV[6] ~= '' and rec[3] == ARGV[6] then
    return start(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
  end
  return {'in_progress', rec[3], rec[4], now - tonumber(rec[5])}
elseif op == 'complete' then
  if redis.call('HGET', key, 'request_id') ~= ARGV[2] then
    return 0
  end
  redis.call('HSET', key, 'state', 'done', 'status', ARGV[3], 'body', ARGV[4],
    'headers', ARGV[5])
  redis.call('PEXPIRE', key, ARGV[6])
  return 1
elseif op == 'abandon' then
  if redis.call('HGET', key, 'request_id') ~= ARGV[2]
      or redis.call('HGET', key, 'state') ~= 'in_progress' then
    return 0
  end
  redis.call('DEL', key)
  return 1
end
return redis.error_reply('unknown idempotency op ' .. tostring(op))
