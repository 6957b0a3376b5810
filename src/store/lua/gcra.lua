-- Shared rate limit: one GCRA (generic cell rate algorithm) step, the same algorithm as the
-- local `governor` limiters, so several replicas share one budget per identity.
-- The key holds the identity's theoretical arrival time (TAT) in microseconds of Redis' own
-- clock (TIME), so replicas whose clocks disagree still agree on the budget. It expires when the
-- budget is full again, so idle identities cost nothing.
-- Not prepended with common.lua: it touches no session keys.
-- KEYS: 1 the limiter key
-- ARGV: 1 emission interval in µs (one request earned back per interval), 2 burst
-- Returns {1, 0} when allowed (and recorded), {0, wait_us} when limited (nothing changed).

-- Needed before Redis 5 to write after a non-deterministic command (a no-op since 7).
if redis.replicate_commands then
  redis.replicate_commands()
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
-- Allowed while the TAT is at most (burst - 1) intervals ahead of now.
local allow_at = tat - period * (burst - 1)
if now < allow_at then
  return {0, allow_at - now}
end
local new_tat = tat + period
-- Whole numbers printed in full: µs since the epoch exceed the 14 digits of tostring().
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, 0}
