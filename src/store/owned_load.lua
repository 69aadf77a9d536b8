-- Load one member's state for its owner, taking the member for the owner's generation.
-- KEYS[1] owner generation (string), KEYS[2] pairs hash, KEYS[3] scored-as_of hash,
-- KEYS[4] member features, KEYS[5] member feature versions, KEYS[6] top-N zset, KEYS[7] rest zset,
-- KEYS[8] meta hash
-- ARGV[1] the loading owner's generation of the member's partition.
-- Returns {0, newer generation} when a later owner has taken the member (the caller is a zombie),
-- else {1, pairs, as_of, features, versions, top (member, score ...), rest (member, score ...),
-- meta's ttl_set_at or false}.
local g = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur > g then return {0, cur} end
if cur < g then redis.call('SET', KEYS[1], ARGV[1]) end
return {1, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5]),
  redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES'),
  redis.call('ZRANGE', KEYS[7], 0, -1, 'WITHSCORES'), redis.call('HGET', KEYS[8], 'ttl_set_at')}
