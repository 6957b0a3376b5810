-- Looks up an access token and decides, on the Redis clock, whether it is valid. Its first use
-- while valid ends its predecessor refresh token's grace (spec "Refreshing access tokens").
-- KEYS: 1 access record, 2 session, 3 used-refresh set
-- ARGV: 1 clock offset ms, 2 session key prefix, 3 access id
-- Returns {'unknown'} | {'revoked'} | {'superseded', now}
--       | {'valid' or 'expired', sealed, expiry, user, device, now}
-- (`now` and `expiry`: ms on the Redis clock, offset included, as text; a caller caching the
-- answer computes validity from them with its own measured offset to Redis.)
local now = clock(ARGV[1])
local a = redis.call('HMGET', KEYS[1], 'ut', 'exp', 'used', 'prev', 'seen')
if not a[1] then
  -- A superseded token whose full record is gone: only its marker (scored by the token's
  -- expiry) is left, and answers soft logout until expiry + retention (spec "Soft logout").
  local exp = redis.call('ZSCORE', ARGV[2] .. 'x', short_id(ARGV[3]))
  if exp and now < tonumber(exp) + SUPERSEDED_RETENTION_MS then
    if redis.call('EXISTS', KEYS[2]) == 1 then
      return {'superseded', int(now)}
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
local exp = tonumber(a[2])
-- Spec "Refreshing access tokens": an expired access token gets M_UNKNOWN_TOKEN with
-- soft_logout: true (the caller answers it; the record stays for /logout).
local status = 'expired'
if now >= exp then
  -- A cache may hold what it was told: its deletion must then be published (consume_refresh).
  if a[3] ~= '1' and a[5] ~= '1' then
    redis.call('HSET', KEYS[1], 'seen', '1')
  end
else
  status = 'valid'
  if a[3] == '0' then
    redis.call('HSET', KEYS[1], 'used', '1')
    if a[4] and a[4] ~= '' then
      local fields = consume_refresh(ARGV[2], a[4], now, KEYS[3], KEYS[2], nil)
      if #fields > 0 then
        redis.call('HSET', KEYS[2], unpack(fields))
      end
    end
  end
end
-- The expiry as stored (the text `int` wrote), not printed again.
return {status, a[1], a[2], s[1], s[2], int(now)}
