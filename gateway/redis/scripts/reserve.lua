-- KEYS: day, month, held, leases, leasev.
-- ARGV: images, cost, day limit, month limit, budget (-1 none), id, lease seconds.
prune(KEYS[3], KEYS[4], KEYS[5], now)
local held = num(redis.call('HGET', KEYS[3], 'images'))
local held_cost = num(redis.call('HGET', KEYS[3], 'cost'))
local d = num(redis.call('HGET', KEYS[1], 'images'))
local m = num(redis.call('HGET', KEYS[2], 'images'))
local spend = num(redis.call('HGET', KEYS[2], 'spend'))
local images, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local ld, lm, lb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if ld >= 0 and ld - (d + held) < images then return 'images_per_day' end
if lm >= 0 and lm - (m + held) < images then return 'images_per_month' end
if lb >= 0 and lb - (spend + held_cost) < cost - 1e-9 then return 'budget_usd_per_month' end
local lease = tonumber(ARGV[7])
redis.call('HINCRBY', KEYS[3], 'images', images)
redis.call('HINCRBYFLOAT', KEYS[3], 'cost', cost)
redis.call('HSET', KEYS[5], ARGV[6], ARGV[1] .. ' ' .. ARGV[2])
redis.call('ZADD', KEYS[4], now + lease, ARGV[6])
local ms = math.ceil(lease * 1000) + 60000
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ms) end
return 'ok'
