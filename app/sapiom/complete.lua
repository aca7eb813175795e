-- Mark a Sapiom transaction completed (the SDK reports the outcome after the request).
-- Never creates a record: a completed id can no longer authenticate anything.
-- KEYS[1]  {k:<key id>}:sapiom:tx:<digest>
-- ARGV[1]  the outcome the SDK reported ("success", "error" or "")
-- Returns the status afterwards, or nil when the transaction is unknown or expired.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if status == 'authorized' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'used', '1', 'outcome', ARGV[1])
  return 'completed'
end
return status
