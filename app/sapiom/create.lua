-- Store one Sapiom transaction and start its lifetime, in one step.
-- KEYS[1]  {k:<key id>}:sapiom:tx:<sha256 of the transaction id's secret part>
-- ARGV[1]  status ("authorized" or "denied")
-- ARGV[2]  the HTTP method it authorizes
-- ARGV[3]  the normalised URL it authorizes
-- ARGV[4]  lifetime in milliseconds
-- ARGV[5]  why it was denied ("" when authorized)
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'method', ARGV[2], 'url', ARGV[3], 'used', '0',
           'reason', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
