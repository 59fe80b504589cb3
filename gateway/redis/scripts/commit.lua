-- KEYS: day, month, held, leases, leasev, done marker.
-- ARGV: id, images, cost, day ttl, month ttl, marker ttl.
-- The marker makes a commit idempotent: one whose reply was lost can be sent again.
if not redis.call('SET', KEYS[6], '1', 'NX', 'EX', ARGV[6]) then return 'done' end
release(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
local images = tonumber(ARGV[2])
if images > 0 then
  redis.call('HINCRBY', KEYS[1], 'images', images)
  redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'images', images)
  redis.call('HINCRBYFLOAT', KEYS[2], 'spend', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 'ok'
