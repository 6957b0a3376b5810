-- Adds (or refreshes) a session in its user's index: a sorted set of session tags scored by
-- when the session's keys expire, beside a hash tag -> device id. Maintenance is O(log n) per
-- call whatever the user's number of sessions (no scan): one ZADD and HSET, and the removal of
-- at most PRUNE entries of sessions already gone by TTL (each entry is removed once, and every
-- call adds at most one, so the index keeps up). The keys live at least as long as the user's
-- longest session. They share the user's hash tag (one cluster slot), never a session's.
-- KEYS: 1 user index (zset `mrp:us:{user}`), 2 devices (hash `mrp:ud:{user}`),
--       3 the index of earlier versions (hash `mrp:u:{user}`)
-- ARGV: 1 session tag, 2 device id, 3 ttl ms of the session's records, 4 clock offset ms
local PRUNE = 8
clock(ARGV[4])
-- Scores mirror the session keys' TTLs: Redis' own clock, without the offset.
local now = real_now
-- A session's fixed keys live up to `slack` past its records; the index outlives them, with an
-- hour to spare for clock differences between Redis nodes after a failover.
local ttl = tonumber(ARGV[3])
ttl = ttl + slack(ttl) + 3600000
-- Never shortened: a session's keys only ever get longer TTLs.
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not cur or cur < now + ttl then
  redis.call('ZADD', KEYS[1], int(now + ttl), ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0, PRUNE)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
-- Moved over from the old hash index, if it was there (O(1)).
redis.call('HDEL', KEYS[3], ARGV[1])
-- Extended with slack as well, so that the next logins and refreshes of the user find them long
-- enough and skip the PEXPIREs (before, each login set both: a count of commands that also
-- depended on whether two logins fell within one millisecond).
local keep_text
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < ttl then
    keep_text = keep_text or int(ttl + slack(ttl))
    redis.call('PEXPIRE', KEYS[i], keep_text)
  end
end
return 'ok'
