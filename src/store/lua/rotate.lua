-- Rotates a live refresh token into a new pair, atomically, every expiry from the Redis clock.
-- A concurrent rotation that won first is reported as grace with the winner's successor, so
-- every caller gets the same pair.
-- KEYS: 1 old refresh record, 2 session, 3 used-refresh set, 4 new access record,
--       5 new refresh record. The session's other keys (the markers `x`, the key index `k` of
--       earlier versions, the records of earlier tokens) are named from the key prefix: every
--       key of a session has its hash tag, so all are in the one slot the script runs on.
-- ARGV: 1 clock offset ms, 2 old refresh id, 3 new access id, 4 new refresh id,
--       5 access sealed, 6 refresh sealed, 7 sealed successor, 8 key prefix,
--       9 access lifetime ms, 10 refresh idle lifetime ms (0 = none)
-- Returns {'ok', now, access expiry, index ttl} | {'gone'} | {'expired'}
--       (index ttl: the TTL the user index must at least have now, 0 = unchanged)
--       | {'grace', sealed successor, successor access expiry, now}
local now = clock(ARGV[1])
-- The successor fields (`next`, `natexp`) only when rotated: every element of a reply costs its
-- conversion into Lua.
local r = redis.call('HMGET', KEYS[1], 'st', 'exp', 'prev')
local s = redis.call('HMGET', KEYS[2], 'u', 'end', 'sx', 'sa', 'ux', 'n')
if not s[1] or not r[1] then
  return {'gone'}
end
-- Each number read once (common.lua: conversions are costly).
local ends = tonumber(s[2])
if r[1] == 'rotated' then
  if refresh_ended(0, ends, now) then
    return {'expired'}
  end
  local g = redis.call('HMGET', KEYS[1], 'next', 'natexp')
  return {'grace', g[1], g[2], int(now)}
end
if refresh_ended(r[2], ends, now) then
  return {'expired'}
end
-- New tokens never outlive the session's absolute end.
local aexp, rexp, ttl = pair_times(now, ends, ARGV[9], ARGV[10])
local now_text, aexp_text, ttl_text = int(now), int(aexp), int(ttl)
local rexp_text = int(rexp)
redis.call('HSET', KEYS[4], 'ut', ARGV[5], 'exp', aexp_text, 'used', '0', 'prev', ARGV[2])
redis.call('PEXPIRE', KEYS[4], ttl_text)
redis.call('HSET', KEYS[5], 'st', 'live', 'ut', ARGV[6], 'exp', rexp_text, 'at', ARGV[3],
  'prev', ARGV[2], 'aexp', aexp_text)
redis.call('PEXPIRE', KEYS[5], ttl_text)
-- Rotated: the sealed upstream token is no longer kept (`ut` emptied).
redis.call('HSET', KEYS[1], 'st', 'rotated', 'next', ARGV[7], 'natexp', aexp_text, 'ut', '')
-- Read by the admin API: last refresh and the current pair's expiries.
local fields = {'lr', now_text, 'aexp', aexp_text, 'rexp', rexp_text, 'cr', ARGV[4]}
local sx = tonumber(s[3])
-- Using this refresh token ends the grace of the one before it.
if r[3] and r[3] ~= '' then
  local more = consume_refresh(ARGV[8], r[3], now, KEYS[3], KEYS[2],
    {s[4], sx, s[5], s[6]}, now_text)
  for _, v in ipairs(more) do
    fields[#fields + 1] = v
  end
end
redis.call('HSET', KEYS[2], unpack(fields))
local reindex = extend_session(ARGV[8], ttl, sx)
if reindex == 0 then
  return {'ok', now_text, aexp_text, '0'}
end
return {'ok', now_text, aexp_text, int(reindex)}
