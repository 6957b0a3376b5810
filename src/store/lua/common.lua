-- Shared helpers, prepended to every script (Redis Lua has no imports), after the constants
-- RETENTION_MS, SUPERSEDED_RETENTION_MS and IDLE_CAP_MS (src/store/redis.rs `script`, from
-- src/session/mod.rs: Lua numbers parsed once when the script is loaded, where as ARGV each call
-- paid a `tonumber`).
-- All keys a script touches share one hash tag (the session's, or the user's for the user
-- index), so they live in one cluster slot.

-- The one clock of every expiry: Redis `TIME` in ms, plus an offset (ARGV; 0 in production,
-- tests move time forward with it). Every expiry is computed from it and every expired / valid
-- / grace decision is made against it inside the scripts, so replicas whose own clocks disagree
-- still agree. Call it before any write: scripts are replicated by their effects (always so
-- since Redis 7; `replicate_commands` switches it on in Redis 3.2-4).
-- Bookkeeping of key lifetimes (index scores that mirror a key's TTL) uses `real_now`, Redis
-- `TIME` without the offset, since Redis expires keys on its own clock.
-- Text to number (`tonumber`) and number to text (`int`) are among the costliest steps of a
-- script here (each a `strtod` or `sprintf`, some 2,500 instructions of Redis: more than a
-- `redis.call('HGET')`): the scripts convert a value once and reuse the text where they can.
local real_now = 0
local function clock(offset)
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  real_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if offset == '0' then
    return real_now
  end
  return real_now + tonumber(offset)
end

-- A whole number as text, printed in full (ms since the epoch exceed tostring()'s 14 digits,
-- and a number handed to redis.call could be printed with an exponent).
-- '%d' (a C long) rather than '%.0f': floating-point printing was a visible cost in Redis'
-- profile of a rotation.
local function int(x)
  return string.format('%d', x)
end

-- The expiries of a new access/refresh pair issued at `now` in a session ending at `ends`
-- (0 = no end), from the lifetimes in ms (`refresh_ms` 0 = no idle limit): access expiry, refresh
-- idle expiry (0 = none) and the TTL of its records. Spec "Refreshing access tokens": access
-- tokens expire; a pair never outlives the session's absolute end. Records are kept until the
-- refresh token could no longer be used (or IDLE_CAP_MS idle when it never expires), plus
-- RETENTION_MS, so that late callers learn "expired" (soft logout, 403) rather than "unknown".
local function pair_times(now, ends, access_ms, refresh_ms)
  ends = tonumber(ends)
  local aexp = now + tonumber(access_ms)
  if ends > 0 and aexp > ends then
    aexp = ends
  end
  local rexp = ends
  refresh_ms = tonumber(refresh_ms)
  if refresh_ms > 0 then
    rexp = now + refresh_ms
    if ends > 0 and rexp > ends then
      rexp = ends
    end
  end
  local live_until = rexp
  if live_until <= 0 then
    live_until = now + IDLE_CAP_MS
  end
  local ttl = math.max(math.max(live_until, aexp) - now, 0) + RETENTION_MS
  return aexp, rexp, ttl
end

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

-- Session keys are extended with some slack, so that a refresh does not have to touch every
-- TTL (and the user index) each time: an eighth of the TTL, at most a day. The session hash
-- remembers in `sx` when its keys expire (Redis clock, no offset), and a rotation extends them
-- only once that is too early for the new records (`extend_session`).
local function slack(ttl)
  return math.min(math.floor(tonumber(ttl) / 8), 86400000)
end

-- Makes the session's fixed keys (`s`, `used`, `x`; `k` of earlier versions) live at least
-- `ttl` ms from now, when `sx` (their recorded expiry) falls short. Returns the TTL the user index must at least
-- have (the keys' new one), or 0 when nothing changed.
local function extend_session(prefix, ttl, sx)
  local need = real_now + tonumber(ttl)
  if (tonumber(sx) or 0) >= need then
    return 0
  end
  local target = need + slack(ttl)
  local keep = target - real_now
  for _, name in ipairs({'s', 'used', 'x', 'k'}) do
    extend(prefix .. name, keep)
  end
  redis.call('HSET', prefix .. 's', 'sx', int(target))
  return keep
end

-- Whether a refresh token can no longer be used: its idle expiry or its session's absolute end
-- (both ms, 0 = none) has passed at `now` (Redis clock). The spec leaves the answer open; the
-- proxy answers 403 M_FORBIDDEN, as Synapse (DESIGN.md "/refresh").
local function refresh_ended(refresh_exp, session_end, now)
  refresh_exp = tonumber(refresh_exp)
  session_end = tonumber(session_end)
  return (refresh_exp > 0 and now >= refresh_exp) or (session_end > 0 and now >= session_end)
end

-- How many markers of superseded access tokens a session keeps (answer: soft logout).
local MARKERS = 16
-- How many ids of used refresh tokens a session keeps (reuse detection).
local USED = 64
-- Both capped sets are trimmed on every TRIM-th consumed refresh token (counted in the session
-- field `n`), not on each: they hold at least MARKERS / USED entries once that many were
-- added, and at most TRIM - 1 more. Two commands fewer on most rotations (issue 11).
local TRIM = 8

-- Ids (hex SHA-256) are kept in the per-session sets truncated to their first 22 hex digits,
-- 88 bits: collisions only matter within one session (under 100 ids at once, so odds about
-- 2^-76), and a forged match gains nothing (a 401 either way).
local function short_id(id)
  return string.sub(id, 1, 22)
end

-- Ends the grace of a rotated refresh token (spec "Refreshing access tokens": the old refresh
-- token is revoked once the new access or refresh token is used; MSC2918 "Token refresh API":
-- the old access token may be revoked right away but need not be). Its id goes into the capped
-- set of used refresh tokens for reuse detection, and the access token issued with it is
-- superseded: a marker in the capped set `x` (id -> its expiry) answers soft logout for it until
-- its expiry plus SUPERSEDED_RETENTION_MS, and only the newest of them keeps its full record (so it still works until its own expiry, and
-- can still log out once expired).
-- The index `k` follows every deletion and TTL change, so it names only live keys.
-- `known`: the session's fields `sa`, `sx` (text or number), `ux` and `n` when the caller read
-- them, else nil. `now_text`: `int(now)` when the caller has it, else nil.
-- Returns the fields of the session hash to write (field, value, ...; the caller writes them
-- with its own HSET): `n`, `sa`, and `ux` once the two sets have their TTL.
local function consume_refresh(prefix, rtid, now, used_key, session_key, known, now_text)
  local rkey = prefix .. 'r:' .. rtid
  local r = redis.call('HMGET', rkey, 'st', 'at', 'aexp')
  if r[1] ~= 'rotated' then
    return {}
  end
  local marker_key = prefix .. 'x'
  local s = known or redis.call('HMGET', session_key, 'sa', 'sx', 'ux', 'n')
  -- `ux`: the sets `used` and `x` exist and have a TTL (set once here, when they are made;
  -- `extend_session` extends them with the session's other fixed keys).
  local ttl_set = s[3] == '1'
  local n = (tonumber(s[4]) or 0) + 1
  local trim = n % TRIM == 0
  local out = {'n', int(n)}
  -- When the session's fixed keys expire (Redis clock): the sets written here live as long.
  -- (Sessions of earlier versions have no `sx`: their TTL is read.)
  local sx = tonumber(s[2])
  if not sx or sx <= real_now then
    sx = real_now + math.max(redis.call('PTTL', session_key), 0)
  end
  local gone = {rkey}
  -- Scored by the negated time of use: the newest id has the lowest score, so ZADD puts it at
  -- the head of the set's listpack without a scan for its place (Redis' `zzlInsert` stops at the
  -- first higher score; at the tail it walked all ~70 entries: 4 % of a refresh's Redis work),
  -- and a trim keeps the lowest ranks. Ids scored by earlier versions (the positive time) rank
  -- after all of these and are trimmed first, as the oldest. Reuse detection reads membership
  -- only (`peek_refresh.lua`).
  redis.call('ZADD', used_key, '-' .. (now_text or int(now)), short_id(rtid))
  if trim then
    redis.call('ZREMRANGEBYRANK', used_key, USED, -1)
  end
  if not ttl_set then
    redis.call('PEXPIREAT', used_key, int(sx))
  end
  if r[2] then
    local akey = prefix .. 'a:' .. r[2]
    -- The paired access token's expiry, kept in the refresh record (records of earlier
    -- versions: read from the access record).
    -- (Its text, as `int` wrote it, is the marker's score below.)
    local aexp_text = r[3] or redis.call('HGET', akey, 'exp')
    local aexp = tonumber(aexp_text)
    if aexp then
      -- Kept until its expiry + retention (it still works until its expiry), never longer.
      local ttl = math.max(aexp - now, 0) + SUPERSEDED_RETENTION_MS
      redis.call('PEXPIRE', akey, int(ttl))
      -- Markers answer soft logout until their score (the token's expiry) + retention; the
      -- lookup compares, and the set is capped, so expired ones need no removal here.
      redis.call('ZADD', marker_key, aexp_text, short_id(r[2]))
      if trim then
        redis.call('ZREMRANGEBYRANK', marker_key, 0, -(MARKERS + 1))
      end
      if not ttl_set then
        redis.call('PEXPIREAT', marker_key, int(sx))
        out[#out + 1] = 'ux'
        out[#out + 1] = '1'
      end
      -- Only the newest superseded token keeps its full record (field `sa` of the session).
      local older = s[1]
      if older and older ~= '' and older ~= r[2] then
        local okey = prefix .. 'a:' .. older
        local o = redis.call('HMGET', okey, 'used', 'seen')
        gone[2] = okey
        -- A replica may still hold it as valid: from now on it answers soft logout. Only a
        -- token that was ever looked up can be in a replica's cache (`used` / `seen`).
        if o[1] == '1' or o[2] == '1' then
          invalidate(session_key)
        end
      end
      out[#out + 1] = 'sa'
      out[#out + 1] = r[2]
    end
  end
  redis.call('DEL', unpack(gone))
  return out
end

-- Deletes every key of a session. Returns {user, device} or {}.
-- A session's token records are found from its hash, with no list of them kept: the live
-- refresh record (`cr`), each refresh record's predecessor (`prev`, at most one still there:
-- the one in grace) and paired access token (`at`), and the newest superseded access token
-- (`sa`); every other record was deleted when it was superseded or consumed. Sessions of
-- earlier versions also listed their records in the key index `k`, still honoured here.
local function purge_session(session_key, index_key, used_key)
  local s = redis.call('HMGET', session_key, 'u', 'd', 'cr', 'sa')
  local prefix = string.sub(session_key, 1, -2)
  local gone = {session_key, index_key, used_key, prefix .. 'x'}
  if s[4] and s[4] ~= '' then
    gone[#gone + 1] = prefix .. 'a:' .. s[4]
  end
  local rid = s[3]
  for _ = 1, 4 do
    if not rid or rid == '' then
      break
    end
    local rkey = prefix .. 'r:' .. rid
    local r = redis.call('HMGET', rkey, 'at', 'prev')
    gone[#gone + 1] = rkey
    if r[1] and r[1] ~= '' then
      gone[#gone + 1] = prefix .. 'a:' .. r[1]
    end
    rid = r[2]
  end
  for _, k in ipairs(redis.call('ZRANGE', index_key, 0, -1)) do
    gone[#gone + 1] = k
  end
  redis.call('DEL', unpack(gone))
  invalidate(session_key)
  if not s[1] then
    return {}
  end
  return {s[1], s[2]}
end
