-- Shared by the quota scripts. Leases: ZSET id -> expiry, HASH id -> 'images cost',
-- HASH held {images, cost}. prune() drops expired leases, release() one lease.
local function prune(held, leases, leasev, now)
  local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, id in ipairs(dead) do
    local v = redis.call('HGET', leasev, id)
    if v then
      local sp = string.find(v, ' ')
      redis.call('HINCRBY', held, 'images', -tonumber(string.sub(v, 1, sp - 1)))
      redis.call('HINCRBYFLOAT', held, 'cost', -tonumber(string.sub(v, sp + 1)))
      redis.call('HDEL', leasev, id)
    end
    redis.call('ZREM', leases, id)
  end
end
local function release(held, leases, leasev, id)
  local v = redis.call('HGET', leasev, id)
  if not v then return end
  local sp = string.find(v, ' ')
  local left = redis.call('HINCRBY', held, 'images', -tonumber(string.sub(v, 1, sp - 1)))
  if left <= 0 then redis.call('HSET', held, 'cost', 0) else
    redis.call('HINCRBYFLOAT', held, 'cost', -tonumber(string.sub(v, sp + 1))) end
  redis.call('HDEL', leasev, id)
  redis.call('ZREM', leases, id)
end
local function num(v) return tonumber(v or '0') or 0 end
