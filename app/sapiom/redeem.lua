-- Consume a Sapiom transaction as the credential of one request: at most once, ever.
-- Any presentation uses it up, also one for the wrong method or URL, so a leaked id cannot
-- be tried against several routes.
-- KEYS[1]  {k:<key id>}:sapiom:tx:<digest>
-- ARGV[1]  the method of the request presenting it
-- ARGV[2]  the normalised URL of the request presenting it
-- Returns "ok", or why not: "unknown" (never issued or expired), "used", "mismatch", or the
-- transaction's status when it is not "authorized" ("denied", "completed").
local tx = redis.call('HMGET', KEYS[1], 'status', 'used', 'method', 'url')
if not tx[1] then
  return 'unknown'
end
if tx[2] == '1' then
  return 'used'
end
if tx[1] ~= 'authorized' then
  return tx[1]
end
redis.call('HSET', KEYS[1], 'used', '1')
if tx[3] ~= ARGV[1] or tx[4] ~= ARGV[2] then
  return 'mismatch'
end
return 'ok'
