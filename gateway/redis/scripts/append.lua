-- KEYS: pool, lru, created, psize, total, refs. ARGV: key, now, then sha, size pairs.
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local added = 0
for i = 3, #ARGV, 2 do
  redis.call('RPUSH', KEYS[1], ARGV[i] .. ' ' .. ARGV[i + 1])
  redis.call('HINCRBY', KEYS[6], ARGV[i], 1)
  added = added + tonumber(ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[4], ARGV[1], added)
redis.call('INCRBY', KEYS[5], added)
return 'ok'
