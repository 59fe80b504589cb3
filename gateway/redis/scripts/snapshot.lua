-- KEYS: day, month, held, leases, leasev, window, inflight.
prune(KEYS[3], KEYS[4], KEYS[5], now)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
return {tostring(now), redis.call('HGET', KEYS[1], 'images') or '0',
  redis.call('HGET', KEYS[2], 'images') or '0', redis.call('HGET', KEYS[2], 'spend') or '0',
  redis.call('HGET', KEYS[3], 'images') or '0', redis.call('HGET', KEYS[3], 'cost') or '0',
  tostring(redis.call('ZCARD', KEYS[6])), first[2] or '', tostring(redis.call('ZCARD', KEYS[7]))}
