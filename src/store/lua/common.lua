-- Shared helpers, prepended to every script (Redis Lua has no imports).
-- All keys a script touches share the session's hash tag, so they live in one cluster slot.

-- Where revocations are published for the replicas' token caches (src/store/invalidation.rs:
-- CHANNEL). The payload is the session's tag; `{inv}` keeps the name in one cluster slot.
local INVALIDATION_CHANNEL = 'mrp:{inv}'

-- Tells every replica's token cache to forget a session (`key`: any key of it). PUBLISH in the
-- script is atomic with the change that needs it and is replicated to replicas and (Cluster) to
-- every node.
local function invalidate(key)
  redis.call('PUBLISH', INVALIDATION_CHANNEL, string.match(key, '{(.-)}'))
end

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

-- How many markers of superseded access tokens a session keeps (answer: soft logout).
local MARKERS = 16
-- How many ids of used refresh tokens a session keeps (reuse detection).
local USED = 64

-- Ids are kept in the per-session sets truncated to 128 bits: collisions only matter within one
-- session, and a forged match gains nothing (a 401 either way).
local function short_id(id)
  return string.sub(id, 1, 22)
end

-- Ends the grace of a rotated refresh token (spec "Refreshing access tokens": the old refresh
-- token is revoked once the new access or refresh token is used). Its id goes into the capped
-- set of used refresh tokens for reuse detection, and the access token issued with it is
-- superseded: a marker in the capped set `x` (id -> its expiry) answers soft logout for it until
-- its expiry plus `retention`, and only the newest of them keeps its full record (so it still works until its own expiry, and
-- can still log out once expired).
-- The index `k` follows every deletion and TTL change, so it names only live keys.
local function consume_refresh(prefix, rtid, now, used_key, session_key, retention)
  local rkey = prefix .. 'r:' .. rtid
  local r = redis.call('HMGET', rkey, 'st', 'at')
  if r[1] ~= 'rotated' then
    return
  end
  local index_key = prefix .. 'k'
  local marker_key = prefix .. 'x'
  retention = tonumber(retention)
  redis.call('DEL', rkey)
  redis.call('ZREM', index_key, rkey)
  redis.call('ZADD', used_key, now, short_id(rtid))
  redis.call('ZREMRANGEBYRANK', used_key, 0, -(USED + 1))
  local sttl = redis.call('PTTL', session_key)
  if r[2] then
    local akey = prefix .. 'a:' .. r[2]
    local aexp = tonumber(redis.call('HGET', akey, 'exp'))
    if aexp then
      local ttl = math.max(aexp - now, 0) + retention
      local cur = redis.call('PTTL', akey)
      if cur < 0 or ttl < cur then
        redis.call('PEXPIRE', akey, ttl)
        redis.call('ZADD', index_key, now + ttl, akey)
      end
      redis.call('ZADD', marker_key, aexp, short_id(r[2]))
      -- Markers past their retention answer nothing any more (as a gone record).
      redis.call('ZREMRANGEBYSCORE', marker_key, '-inf', now - retention)
      -- Only the newest superseded token keeps its full record (field `sa` of the session).
      local older = redis.call('HGET', session_key, 'sa')
      if older and older ~= r[2] then
        local okey = prefix .. 'a:' .. older
        redis.call('DEL', okey)
        redis.call('ZREM', index_key, okey)
        -- A replica may still hold it as valid: from now on it answers soft logout.
        invalidate(session_key)
      end
      redis.call('HSET', session_key, 'sa', r[2])
      redis.call('ZREMRANGEBYRANK', marker_key, 0, -(MARKERS + 1))
    end
  end
  if sttl > 0 then
    redis.call('PEXPIRE', used_key, sttl)
    if redis.call('EXISTS', marker_key) == 1 then
      redis.call('PEXPIRE', marker_key, sttl)
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
  redis.call('DEL', session_key, index_key, used_key, string.sub(session_key, 1, -2) .. 'x')
  invalidate(session_key)
  if not s[1] then
    return {}
  end
  return {s[1], s[2]}
end
