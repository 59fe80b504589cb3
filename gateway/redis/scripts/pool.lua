-- KEYS: pool, lru. ARGV: now, key.
local items = redis.call('LRANGE', KEYS[1], 0, 9)  -- at most MAX_POOL are ever served
if #items > 0 then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2]) end
return items
