-- KEYS: flight lock, channel. ARGV: token, key. Wakes the waiters of other replicas.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 'ok'
