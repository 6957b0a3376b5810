-- Removes a session from its user's index (and from the index of earlier versions). O(log n).
-- Not prepended with common.lua. KEYS share the user's hash tag (one cluster slot).
-- KEYS: 1 user index (zset), 2 devices (hash), 3 the index of earlier versions (hash)
-- ARGV: 1 session tag
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 'ok'
