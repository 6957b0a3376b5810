-- A write that changes nothing, so that the WAIT after it covers every earlier write on this
-- node (WAIT waits for the calling connection's last write): used before a grace replay is
-- answered, whose tokens another connection wrote. Not prepended with common.lua.
-- KEYS: 1 session
local c = redis.call('HGET', KEYS[1], 'c')
if c then
  redis.call('HSET', KEYS[1], 'c', c)
end
return 'ok'
