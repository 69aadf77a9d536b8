-- Load members' state for their owner, taking each member for the owner's generation. One call
-- covers several members on a single Redis (one on a cluster, where a call stays in one slot).
-- KEYS, 8 per member: owner generation (string), pairs hash, scored-as_of hash, member features,
-- member feature versions, top-N zset, rest zset, meta hash.
-- ARGV: the loading owner's generation of each member's partition.
-- Returns per member {0, newer generation} when a later owner has taken it (the caller is a
-- zombie), else {1, pairs, as_of, features, versions, top (member, score ...),
-- rest (member, score ...), meta's ttl_set_at or false}.
local out = {}
for j = 1, #ARGV do
  local b = (j - 1) * 8
  local g = tonumber(ARGV[j])
  local cur = tonumber(redis.call('GET', KEYS[b + 1]) or '0')
  if cur > g then
    out[j] = {0, cur}
  else
    if cur < g then redis.call('SET', KEYS[b + 1], ARGV[j]) end
    out[j] = {1, redis.call('HGETALL', KEYS[b + 2]), redis.call('HGETALL', KEYS[b + 3]),
      redis.call('HGETALL', KEYS[b + 4]), redis.call('HGETALL', KEYS[b + 5]),
      redis.call('ZRANGE', KEYS[b + 6], 0, -1, 'WITHSCORES'),
      redis.call('ZRANGE', KEYS[b + 7], 0, -1, 'WITHSCORES'),
      redis.call('HGET', KEYS[b + 8], 'ttl_set_at')}
  end
end
return out
