-- One reverse-index change (as rev.lua), then the candidate's features, read in the same call:
-- a candidate update either happened before this read (and is in it) or fans out after the
-- change (and reaches the member), so its owner never keeps features older than both.
-- KEYS[1] members set, KEYS[2] versions hash, KEYS[3] candidate features hash
-- ARGV[1] member, ARGV[2] ts, ARGV[3] offset, ARGV[4] 'add' or 'rem'
-- Returns the candidate's features (HGETALL).
local cur = redis.call('HGET', KEYS[2], ARGV[1])
local newer = true
if cur then
  local sep = string.find(cur, ':', 1, true)
  local cts, co = tonumber(string.sub(cur, 1, sep - 1)), tonumber(string.sub(cur, sep + 1))
  local ts, o = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ts < cts or (ts == cts and o < co) then newer = false end
end
if newer then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
  if ARGV[4] == 'add' then
    redis.call('SADD', KEYS[1], ARGV[1])
  else
    redis.call('SREM', KEYS[1], ARGV[1])
  end
end
return redis.call('HGETALL', KEYS[3])
