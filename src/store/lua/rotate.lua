-- Rotates a live refresh token into a new pair, atomically. A concurrent rotation that won
-- first is reported as grace with the winner's successor, so every caller gets the same pair.
-- KEYS: 1 old refresh record, 2 session, 3 key index, 4 used-refresh set,
--       5 new access record, 6 new refresh record
-- ARGV: 1 now ms, 2 old refresh id, 3 new access id, 4 new refresh id,
--       5 access sealed, 6 access expiry, 7 access ttl, 8 refresh sealed, 9 refresh expiry,
--       10 refresh ttl, 11 sealed successor, 12 session ttl, 13 key prefix, 14 retention ms
-- Returns {'ok'} | {'gone'} | {'expired'} | {'grace', sealed successor, successor access expiry}
local r = redis.call('HMGET', KEYS[1], 'st', 'exp', 'prev', 'next', 'natexp')
local s = redis.call('HMGET', KEYS[2], 'u', 'end')
if not s[1] or not r[1] then
  return {'gone'}
end
if r[1] == 'rotated' then
  return {'grace', r[4], r[5]}
end
local now = tonumber(ARGV[1])
if refresh_ended(r[2], s[2], now) then
  return {'expired'}
end
redis.call('HSET', KEYS[5], 'ut', ARGV[5], 'exp', ARGV[6], 'used', '0', 'prev', ARGV[2])
redis.call('PEXPIRE', KEYS[5], ARGV[7])
redis.call('HSET', KEYS[6], 'st', 'live', 'ut', ARGV[8], 'exp', ARGV[9], 'at', ARGV[3], 'prev', ARGV[2])
redis.call('PEXPIRE', KEYS[6], ARGV[10])
redis.call('HSET', KEYS[1], 'st', 'rotated', 'next', ARGV[11], 'natexp', ARGV[6])
redis.call('HDEL', KEYS[1], 'ut')
-- Read by the admin API: last refresh and the current pair's expiries.
redis.call('HSET', KEYS[2], 'lr', ARGV[1], 'aexp', ARGV[6], 'rexp', ARGV[9])
-- Using this refresh token ends the grace of the one before it.
if r[3] and r[3] ~= '' then
  consume_refresh(ARGV[13], r[3], now, KEYS[4], KEYS[2], ARGV[14])
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), KEYS[5], now + tonumber(ARGV[10]), KEYS[6])
-- Index entries of keys whose TTL has passed are dead weight.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
extend(KEYS[2], ARGV[12])
extend(KEYS[3], ARGV[12])
extend(KEYS[4], ARGV[12])
return {'ok'}
