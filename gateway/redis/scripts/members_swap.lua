-- KEYS: members hash, revoked-token set, version counter, change channel.
-- ARGV: name, the record expected now ('' = absent), the new record ('' = remove),
-- then the digests of revoked tokens. Compare-and-set: 0 if the record changed first.
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
for i = 4, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', KEYS[4], version)
return 1
