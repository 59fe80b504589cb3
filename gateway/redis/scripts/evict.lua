-- KEYS: lru, created, psize, total, refs.
-- ARGV: prefix of pool keys, max bytes, cutoff, then 0 and the keys to keep (in use);
-- or, to forget one pool, 1, its key and the items seen: it goes (whatever its age)
-- only if it still begins with them.
local orphans = {}
local function drop(key)
  local pool = ARGV[1] .. key
  for _, item in ipairs(redis.call('LRANGE', pool, 0, -1)) do
    local sha = string.sub(item, 1, string.find(item, ' ') - 1)
    if redis.call('HINCRBY', KEYS[5], sha, -1) <= 0 then
      redis.call('HDEL', KEYS[5], sha)
      table.insert(orphans, sha)
    end
  end
  redis.call('DEL', pool)
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], key) or '0'))
  redis.call('HDEL', KEYS[3], key)
end
local ndrop = tonumber(ARGV[4])
if ndrop > 0 then  -- forget one key, if its pool is still what was seen
  local seen = #ARGV - 5
  local pool = redis.call('LRANGE', ARGV[1] .. ARGV[5], 0, seen - 1)
  if seen == 0 or #pool ~= seen then return {{}, {}} end
  for i = 1, seen do
    if pool[i] ~= ARGV[5 + i] then return {{}, {}} end
  end
  drop(ARGV[5])
  return {{}, orphans}
end
local keep = {}
for i = 5 + ndrop, #ARGV do keep[ARGV[i]] = true end
local held = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])) do
  if keep[key] then table.insert(held, key) else drop(key) end
end
local max = tonumber(ARGV[2])
local kept = 0  -- kept keys stay at the front of the LRU order: skip past them
while tonumber(redis.call('GET', KEYS[4]) or '0') > max do
  local oldest = redis.call('ZRANGE', KEYS[1], kept, kept)
  if #oldest == 0 then break end
  if keep[oldest[1]] then
    kept = kept + 1
    table.insert(held, oldest[1])
  else
    drop(oldest[1])
  end
end
return {held, orphans}
