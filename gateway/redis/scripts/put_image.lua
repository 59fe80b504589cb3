-- KEYS: data, mint, size, total. ARGV: id, bytes, now, budget (-1 none), data prefix.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[1], string.len(ARGV[2]))
  redis.call('INCRBY', KEYS[4], string.len(ARGV[2]))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local budget = tonumber(ARGV[4])
local gone = 0
while budget >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') > budget do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or oldest[1] == ARGV[1] then break end
  redis.call('DEL', ARGV[5] .. oldest[1])
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0'))
  redis.call('HDEL', KEYS[3], oldest[1])
  gone = gone + 1
end
return gone
