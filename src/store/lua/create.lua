-- Creates a session with its first access/refresh pair; every expiry from the Redis clock.
-- KEYS: 1 session, 2 access record, 3 refresh record (no key index: purge finds the records
--       from the session hash)
-- ARGV: 1 user_id, 2 device_id, 3 clock offset ms, 4 access sealed upstream token,
--       5 refresh sealed upstream token, 6 access id, 7 access lifetime ms,
--       8 refresh idle lifetime ms (0 = none), 9 session lifetime ms (0 = none),
--       10 upstream token sealed under the server key (field `ue`; '' = none, no field)
-- Returns {now, access expiry, '0'} (ms, as text; the third as rotate.lua's index ttl).
local now = clock(ARGV[3])
local ends = 0
local lifetime = tonumber(ARGV[9])
if lifetime > 0 then
  ends = now + lifetime
end
local aexp, rexp, ttl = pair_times(now, ends, ARGV[7], ARGV[8])
local keep = ttl + slack(ttl)
-- Each number printed once (common.lua: conversions are costly).
local now_text, aexp_text, rexp_text, ttl_text = int(now), int(aexp), int(rexp), int(ttl)
local ends_text = '0'
if ends > 0 then
  ends_text = int(ends)
end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'd', ARGV[2], 'end', ends_text, 'c', now_text,
  'lr', '0', 'aexp', aexp_text, 'rexp', rexp_text, 'sx', int(real_now + keep),
  'cr', string.match(KEYS[3], ':r:([^:]+)$'))
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[1], 'ue', ARGV[10])
end
redis.call('PEXPIRE', KEYS[1], int(keep))
redis.call('HSET', KEYS[2], 'ut', ARGV[4], 'exp', aexp_text, 'used', '0', 'prev', '')
redis.call('PEXPIRE', KEYS[2], ttl_text)
redis.call('HSET', KEYS[3], 'st', 'live', 'ut', ARGV[5], 'exp', rexp_text, 'at', ARGV[6],
  'prev', '', 'aexp', aexp_text)
redis.call('PEXPIRE', KEYS[3], ttl_text)
return {now_text, aexp_text, '0'}
