-- KEYS: blocked, window, inflight. ARGV: rpm (-1 none), max_concurrent (-1), slot, lease.
if redis.call('EXISTS', KEYS[1]) == 1 then return {'blocked', '0'} end
local rpm, maxc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if rpm >= 0 and redis.call('ZCARD', KEYS[2]) >= rpm then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local wait = 60
  if first[2] then wait = tonumber(first[2]) + 60 - now end
  return {'requests_per_minute', tostring(wait)}
end
if maxc >= 0 and redis.call('ZCARD', KEYS[3]) >= maxc then return {'max_concurrent', '1'} end
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[2], 61000)
redis.call('ZADD', KEYS[3], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000) + 1000)
return {'ok', '0'}
