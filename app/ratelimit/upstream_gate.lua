-- The global upstream concurrency gate: at most `capacity` requests at fal at once, across all
-- gateway processes, granted fairly across keys.
--
-- Every holder and waiter has a lease (renewed by its process); an expired lease is dropped
-- here, so a crashed process's slots come back on their own. Free slots go to the waiting key
-- that holds the fewest slots, and within a key to its oldest waiter: one key's burst cannot
-- starve another key.
--
-- The common case, a slot free and nobody waiting, takes the slot (or gives it back) in a
-- handful of commands. Expired leases are reclaimed only where they could be in someone's
-- way: when the slots are all taken, when anyone waits, and for the stats; an expired holder
-- only ever makes the gate stricter, never looser.
--
-- KEYS (all under {falgate:gate}):
--   1 holders   zset  request id -> lease deadline (ms)
--   2 owners    hash  request id -> key id (holders and waiters)
--   3 perkey    hash  key id -> slots held
--   4 waiters   zset  request id -> arrival sequence number
--   5 wleases   zset  request id -> waiter lease deadline (ms)
--   6 seq       string, arrival counter
-- ARGV: 1 op ('acquire'|'release'|'renew'|'stats'), 2 capacity, 3 lease_ms,
--       4 request id, 5 key id   ('renew': ARGV[4..] are request ids)
--
-- Replies: acquire -> {1} granted | {0, position}; release -> 1; renew -> count; stats ->
--   {holding, waiting}

local holders, owners, perkey, waiters, wleases, seq =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local op, capacity, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function drop_holder(rid)
  if redis.call('ZREM', holders, rid) == 1 then
    local key = redis.call('HGET', owners, rid)
    if key then
      if redis.call('HINCRBY', perkey, key, -1) <= 0 then
        redis.call('HDEL', perkey, key)
      end
    end
  end
  redis.call('HDEL', owners, rid)
end

local function drop_waiter(rid)
  redis.call('ZREM', waiters, rid)
  redis.call('ZREM', wleases, rid)
  if not redis.call('ZSCORE', holders, rid) then
    redis.call('HDEL', owners, rid)
  end
end

-- Reclaim the slots and places of processes that stopped renewing (crashed).
local function reclaim()
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', holders, '-inf', now)) do
    drop_holder(rid)
  end
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', wleases, '-inf', now)) do
    drop_waiter(rid)
  end
end

local function grant_free_slots()
  local free = capacity - redis.call('ZCARD', holders)
  if free <= 0 or redis.call('ZCARD', waiters) == 0 then
    return
  end
  -- Each key's waiters in arrival order, and the keys in order of their oldest waiter.
  local queues, order = {}, {}
  for _, rid in ipairs(redis.call('ZRANGE', waiters, 0, -1)) do
    local key = redis.call('HGET', owners, rid) or ''
    if not queues[key] then
      queues[key] = {head = 1, rids = {}}
      table.insert(order, key)
    end
    table.insert(queues[key].rids, rid)
  end
  local held = {}
  for _, key in ipairs(order) do
    held[key] = tonumber(redis.call('HGET', perkey, key)) or 0
  end
  while free > 0 do
    local best = nil
    for _, key in ipairs(order) do
      local q = queues[key]
      if q.head <= #q.rids and (best == nil or held[key] < held[best]) then
        best = key
      end
    end
    if best == nil then
      return
    end
    local q = queues[best]
    local rid = q.rids[q.head]
    q.head = q.head + 1
    redis.call('ZREM', waiters, rid)
    redis.call('ZREM', wleases, rid)
    redis.call('ZADD', holders, now + lease_ms, rid)
    redis.call('HINCRBY', perkey, best, 1)
    held[best] = held[best] + 1
    free = free - 1
  end
end

if op == 'acquire' then
  local rid, key = ARGV[4], ARGV[5]
  if redis.call('ZSCORE', holders, rid) then
    redis.call('ZADD', holders, now + lease_ms, rid)
    return {1}
  end
  if redis.call('ZCARD', waiters) == 0 and redis.call('ZCARD', holders) < capacity then
    redis.call('ZADD', holders, now + lease_ms, rid)
    redis.call('HSET', owners, rid, key)
    redis.call('HINCRBY', perkey, key, 1)
    return {1}
  end
  reclaim()
  if not redis.call('ZSCORE', waiters, rid) then
    redis.call('ZADD', waiters, redis.call('INCR', seq), rid)
    redis.call('HSET', owners, rid, key)
  end
  redis.call('ZADD', wleases, now + lease_ms, rid)
  grant_free_slots()
  if redis.call('ZSCORE', holders, rid) then
    return {1}
  end
  return {0, redis.call('ZRANK', waiters, rid) + 1}
elseif op == 'release' then
  local rid = ARGV[4]
  drop_holder(rid)
  if redis.call('ZCARD', waiters) > 0 then -- rid itself may be one (it gave up waiting)
    drop_waiter(rid)
    reclaim()
    grant_free_slots()
  end
  return 1
elseif op == 'renew' then
  local renewed = 0
  for i = 4, #ARGV do
    renewed = renewed + redis.call('ZADD', holders, 'XX', 'CH', now + lease_ms, ARGV[i])
    redis.call('ZADD', wleases, 'XX', now + lease_ms, ARGV[i])
  end
  return renewed
elseif op == 'stats' then
  reclaim()
  grant_free_slots()
  return {redis.call('ZCARD', holders), redis.call('ZCARD', waiters)}
end
return redis.error_reply('unknown gate op ' .. tostring(op))
