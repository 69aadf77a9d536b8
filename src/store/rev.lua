-- One reverse-index change (candidate -> members having it), guarded like the pair it follows: it
-- applies only when its (ts, offset) is newer than the last change applied for this member, so
-- changes that reach Redis out of order (concurrent commands on a cluster, two workers during a
-- rebalance) leave the index as the newest change says.
-- KEYS[1] members set, KEYS[2] versions hash (member -> "ts:offset" of the last change)
-- ARGV[1] member, ARGV[2] ts, ARGV[3] offset, ARGV[4] 'add' or 'rem'
-- Returns 1 when applied (a replay of the same change applies again, idempotently), 0 when a newer
-- change was already applied.
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  local cts, co = tonumber(string.sub(cur, 1, sep - 1)), tonumber(string.sub(cur, sep + 1))
  local ts, o = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ts < cts or (ts == cts and o < co) then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
if ARGV[4] == 'add' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
return 1
