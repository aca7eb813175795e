-- Prepended to the scripts that meet fal's answer for a hold (attach, handoff, resolve; see
-- meter.py): a hold the resolver released as 'abandoned' (its lease ran out before fal's
-- request id was recorded: its process was stalled or cut off from Redis, not dead) is put
-- back when its request turns out to be alive with a job fal accepted, so that what fal does
-- and bills is settled like any other job instead of going unrecorded.
--
-- The release stays in the ledger; a second 'hold' entry (reason 'reinstated') follows it. The
-- money the release gave back may have been admitted to other requests meanwhile: this is the
-- one case where settled + held can pass the budget, because fal did the work.

-- The hold's JSON as resolve.lua keeps it on the request record of an abandoned release.
local ABANDONED_HOLD = 'abandoned_hold'

-- keys: holds, record, budget, inflight, leases, ledger (the key's own, one slot).
-- Returns the reinstated hold's JSON, or nil when the request was not abandoned.
local function reinstate_hold(keys, key_id, request_id, upstream, process_id, lease_ms, now_us)
  local rec = redis.call('HMGET', keys.record, 'state', 'reason', ABANDONED_HOLD)
  if rec[1] ~= 'released' or rec[2] ~= 'abandoned' or not rec[3] then
    return nil
  end
  local hold = cjson.decode(rec[3])
  hold.state = 'submitted'
  hold.process = process_id
  if upstream ~= '' then
    hold.upstream = upstream
  end
  local raw = cjson.encode(hold)
  local now_ms = ms_of(now_us)
  redis.call('HSET', keys.holds, request_id, raw)
  redis.call('HSET', keys.inflight, request_id, process_id)
  redis.call('HINCRBY', keys.budget, 'held', tonumber(hold.amount))
  redis.call('ZADD', keys.leases, fmt(now_ms + lease_ms), request_id)
  redis.call('HSET', keys.record, 'status', 'pending', 'state', 'submitted',
    'upstream', hold.upstream or '', 'reason', 'reinstated')
  redis.call('HDEL', keys.record, ABANDONED_HOLD, 'charged_micro', 'released_micro',
    'resolved_ms')
  redis.call('XADD', keys.ledger, '*',
    'event', 'hold', 'key_id', key_id, 'request_id', request_id,
    'upstream_request_id', hold.upstream or '', 'model', hold.model,
    'operation', hold.operation, 'pixels', hold.pixels, 'amount_micro', hold.amount,
    'reason', 'reinstated', 'ts_ms', fmt(now_ms), 'process_id', process_id)
  return raw
end
