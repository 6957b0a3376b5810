-- Adds (or refreshes) a session in its user's index and keeps the index alive at least as long
-- as the session. Each entry carries the session's own expiry, so entries of sessions that died
-- by TTL are pruned here and the index stays bounded.
-- KEYS: 1 user index
-- ARGV: 1 session tag, 2 device id, 3 ttl ms, 4 clock offset ms
clock(ARGV[4])
-- Entries mirror the session keys' TTLs: Redis' own clock, without the offset.
local now = real_now
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. int(now + ttl))
if redis.call('HLEN', KEYS[1]) > 16 then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local exp = tonumber(string.match(all[i + 1], '\n(%d+)$'))
    if exp and exp < now then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
local cur = redis.call('PTTL', KEYS[1])
if cur < ttl then
  redis.call('PEXPIRE', KEYS[1], int(ttl))
end
return 'ok'
