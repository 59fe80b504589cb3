-- KEYS: member's end users (ZSET user -> last seen), member's limit hits (LIST of times),
-- raised markers for many_end_users and repeated_limit_hits. ARGV: window s, end user
-- ('' for none), 1 if a limit was hit, distinct end users, limit hits, users tracked.
local window = tonumber(ARGV[1])
local cutoff = now - window
local ttl = math.ceil(window * 1000)
local out = {}
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
  local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[6])
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1) end
  redis.call('PEXPIRE', KEYS[1], ttl)
  local distinct = redis.call('ZCARD', KEYS[1])
  if distinct >= tonumber(ARGV[4]) and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ttl) then
    table.insert(out, 'many_end_users')
    table.insert(out, distinct)
  end
end
if ARGV[3] == '1' then
  local keep = math.max(1, tonumber(ARGV[5]))
  redis.call('RPUSH', KEYS[2], tostring(now))
  redis.call('LTRIM', KEYS[2], -keep, -1)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local hits = 0
  for _, t in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if tonumber(t) >= cutoff then hits = hits + 1 end
  end
  if hits >= tonumber(ARGV[5]) and redis.call('SET', KEYS[4], '1', 'NX', 'PX', ttl) then
    table.insert(out, 'repeated_limit_hits')
    table.insert(out, hits)
  end
end
return out
