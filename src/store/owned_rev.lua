-- Reverse-index changes (as rev.lua), each followed by its candidate's features read in the same
-- call: a candidate update either happened before this read (and is in it) or fans out after the
-- change (and reaches the member), so its owner never keeps features older than both. One call
-- covers several changes on a single Redis (one on a cluster, where a call stays in one slot).
-- KEYS, 3 per change: members set, versions hash, candidate features hash.
-- ARGV, 4 per change: member, ts, offset, 'add' or 'rem'.
-- Returns per change the candidate's features (HGETALL).
local out = {}
for j = 1, #ARGV / 4 do
  local b, a = (j - 1) * 3, (j - 1) * 4
  local member, ts, o = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local cur = redis.call('HGET', KEYS[b + 2], member)
  local newer = true
  if cur then
    local sep = string.find(cur, ':', 1, true)
    local cts, co = tonumber(string.sub(cur, 1, sep - 1)), tonumber(string.sub(cur, sep + 1))
    if ts < cts or (ts == cts and o < co) then newer = false end
  end
  if newer then
    redis.call('HSET', KEYS[b + 2], member, ARGV[a + 2] .. ':' .. ARGV[a + 3])
    if ARGV[a + 4] == 'add' then
      redis.call('SADD', KEYS[b + 1], member)
    else
      redis.call('SREM', KEYS[b + 1], member)
    end
  end
  out[j] = redis.call('HGETALL', KEYS[b + 3])
end
return out
