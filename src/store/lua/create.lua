-- Creates a session with its first access/refresh pair.
-- KEYS: 1 session, 2 access record, 3 refresh record, 4 key index
-- ARGV: 1 user_id, 2 device_id, 3 session end ms (0 = none), 4 now ms,
--       5 access sealed upstream token, 6 access expiry ms, 7 access ttl ms,
--       8 refresh sealed upstream token, 9 refresh expiry ms (0 = none), 10 refresh ttl ms,
--       11 session ttl ms, 12 access id,
--       13 upstream token sealed under the server key (field `ue`; '' = none, no field)
local now = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'd', ARGV[2], 'end', ARGV[3], 'c', ARGV[4], 'lr', '0',
  'aexp', ARGV[6], 'rexp', ARGV[9])
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'ue', ARGV[13])
end
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('HSET', KEYS[2], 'ut', ARGV[5], 'exp', ARGV[6], 'used', '0', 'prev', '')
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('HSET', KEYS[3], 'st', 'live', 'ut', ARGV[8], 'exp', ARGV[9], 'at', ARGV[12], 'prev', '')
redis.call('PEXPIRE', KEYS[3], ARGV[10])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), KEYS[2], now + tonumber(ARGV[10]), KEYS[3])
redis.call('PEXPIRE', KEYS[4], ARGV[11])
return 'ok'
