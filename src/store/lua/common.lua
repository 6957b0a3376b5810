-- Shared helpers, prepended to every script (Redis Lua has no imports).
-- All keys a script touches share the session's hash tag, so they live in one cluster slot.

-- Extends a key's TTL to at least `ttl` ms; never shortens it.
local function extend(key, ttl)
  ttl = tonumber(ttl)
  local cur = redis.call('PTTL', key)
  if cur >= 0 and cur < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- Whether a refresh token can no longer be used: its idle expiry or its session's absolute end
-- (both ms, 0 = none) has passed (403 M_FORBIDDEN, as Synapse).
local function refresh_ended(refresh_exp, session_end, now)
  refresh_exp = tonumber(refresh_exp)
  session_end = tonumber(session_end)
  return (refresh_exp > 0 and now >= refresh_exp) or (session_end > 0 and now >= session_end)
end

-- Ends the grace of a rotated refresh token (spec "Refreshing access tokens": the old refresh
-- token is revoked once the new access or refresh token is used). Its id goes into the capped
-- set of used refresh tokens for reuse detection, and the access token issued with it is kept
-- only until its own expiry plus `retention`.
local function consume_refresh(prefix, rtid, now, used_key, session_key, retention)
  local rkey = prefix .. 'r:' .. rtid
  local r = redis.call('HMGET', rkey, 'st', 'at')
  if r[1] ~= 'rotated' then
    return
  end
  redis.call('DEL', rkey)
  redis.call('ZADD', used_key, now, rtid)
  -- Remember the 64 most recent used refresh tokens of the session; bounded memory.
  redis.call('ZREMRANGEBYRANK', used_key, 0, -65)
  local sttl = redis.call('PTTL', session_key)
  if sttl > 0 then
    redis.call('PEXPIRE', used_key, sttl)
  end
  if r[2] then
    local akey = prefix .. 'a:' .. r[2]
    local aexp = tonumber(redis.call('HGET', akey, 'exp'))
    if aexp then
      local ttl = math.max(aexp - now, 0) + tonumber(retention)
      local cur = redis.call('PTTL', akey)
      if cur < 0 or ttl < cur then
        redis.call('PEXPIRE', akey, ttl)
      end
    end
  end
end

-- Deletes every key of a session. Returns {user, device} or {}.
local function purge_session(session_key, index_key, used_key)
  local s = redis.call('HMGET', session_key, 'u', 'd')
  local keys = redis.call('ZRANGE', index_key, 0, -1)
  for _, k in ipairs(keys) do
    redis.call('DEL', k)
  end
  redis.call('DEL', session_key, index_key, used_key)
  if not s[1] then
    return {}
  end
  return {s[1], s[2]}
end
