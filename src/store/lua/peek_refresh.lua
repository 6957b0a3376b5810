-- Reads a refresh token's state and decides, on the Redis clock, whether it has ended; on reuse
-- after grace, optionally revokes the session.
-- KEYS: 1 refresh record, 2 session, 3 key index, 4 used-refresh set
-- ARGV: 1 clock offset ms, 2 refresh id, 3 revoke on reuse ('1'/'0')
-- Returns {'unknown'} | {'expired'} | {'reused', user, device, revoked}
--       | {'grace', sealed successor, successor access expiry, now}
--       | {'live', sealed, user, device}
local now = clock(ARGV[1])
local s = redis.call('HMGET', KEYS[2], 'u', 'd', 'end')
local r = redis.call('HMGET', KEYS[1], 'st', 'ut', 'exp', 'next', 'natexp')
if not s[1] then
  if r[1] then
    redis.call('DEL', KEYS[1])
  end
  return {'unknown'}
end
if not r[1] then
  -- RFC 9700 §4.14.2: a refresh token presented again after its grace is a replay.
  if redis.call('ZSCORE', KEYS[4], short_id(ARGV[2])) then
    if ARGV[3] == '1' then
      purge_session(KEYS[2], KEYS[3], KEYS[4])
      return {'reused', s[1], s[2], '1'}
    end
    return {'reused', s[1], s[2], '0'}
  end
  return {'unknown'}
end
if r[1] == 'rotated' then
  -- Spec "Refreshing access tokens": the old refresh token stays valid until the new access or
  -- refresh token is used; within that grace it gives the same successor pair again, but never
  -- past the session's absolute end.
  if refresh_ended(0, s[3], now) then
    return {'expired'}
  end
  return {'grace', r[4], r[5], int(now)}
end
if refresh_ended(r[3], s[3], now) then
  return {'expired'}
end
return {'live', r[2], s[1], s[2]}
