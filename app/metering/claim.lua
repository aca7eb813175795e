-- A sweeper claims an orphaned hold before asking fal about it, so that of several sweepers
-- racing only one does the work. (Resolving stays exactly-once without the claim: resolve.lua
-- acts only while the hold exists.)
--
-- KEYS: 1 holds (under {k:<id>})
-- ARGV: 1 request_id, 2 claimer (sweeper's process id), 3 claim_ms (0 = give the claim up),
--       4 min_age_ms, 5 the dead process the hold must still belong to
-- Reply: the hold's JSON when claimed, false otherwise (gone, too young, already claimed)

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return false
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = cjson.decode(raw)
if hold.process ~= ARGV[5] then
  return false
end
if tonumber(ARGV[3]) == 0 then
  if hold.claimer == ARGV[2] then
    hold.claimer = ''
    hold.claim_until_ms = '0'
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hold))
  end
  return false
end
if now - tonumber(hold.created_ms) < tonumber(ARGV[4]) then
  return false
end
if tonumber(hold.claim_until_ms) > now then
  return false
end
hold.claimer = ARGV[2]
hold.claim_until_ms = string.format('%.0f', now + tonumber(ARGV[3]))
raw = cjson.encode(hold)
redis.call('HSET', KEYS[1], ARGV[1], raw)
return raw
