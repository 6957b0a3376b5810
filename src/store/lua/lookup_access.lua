-- Looks up an access token. Its first use while valid ends its predecessor refresh token's grace.
-- KEYS: 1 access record, 2 session, 3 used-refresh set
-- ARGV: 1 now ms, 2 session key prefix, 3 superseded access retention ms, 4 access id
-- Returns {'unknown'} | {'revoked'} | {'superseded'} | {'found', sealed, expiry, user, device}
local a = redis.call('HMGET', KEYS[1], 'ut', 'exp', 'used', 'prev')
if not a[1] then
  -- A superseded token whose full record is gone: only its marker is left (soft logout).
  if redis.call('ZSCORE', ARGV[2] .. 'x', short_id(ARGV[4])) then
    if redis.call('EXISTS', KEYS[2]) == 1 then
      return {'superseded'}
    end
    return {'revoked'}
  end
  return {'unknown'}
end
local s = redis.call('HMGET', KEYS[2], 'u', 'd')
if not s[1] then
  redis.call('DEL', KEYS[1])
  return {'revoked'}
end
local now = tonumber(ARGV[1])
if now < tonumber(a[2]) and a[3] == '0' then
  redis.call('HSET', KEYS[1], 'used', '1')
  if a[4] and a[4] ~= '' then
    consume_refresh(ARGV[2], a[4], now, KEYS[3], KEYS[2], ARGV[3])
  end
end
return {'found', a[1], a[2], s[1], s[2]}
