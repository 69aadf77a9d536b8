-- Write a member's new scores, each guarded by event time: a score computed as of an earlier time
-- never replaces one computed as of a later time. Then refresh the top-N set, its TTL and meta.
-- KEYS[1] pairs hash, KEYS[2] scored-as_of hash, KEYS[3] all-scores zset, KEYS[4] top-N zset,
-- KEYS[5] meta hash
-- ARGV[1] model, ARGV[2] top N, ARGV[3] ttl ms, ARGV[4] now ms, then candidate, score, as_of...
-- Returns one {flag, as_of} per candidate: {1, as_of} written, {0, stored as_of} a later score is
-- already there, {-1, '0'} the pair is gone (removed or never stored).
local flags = {}
local written = 0
local max_asof = -1
local max_asof_str = nil
-- One read of each hash and one variadic write of each key for the whole call: a redis.call from
-- a script costs more than the work it does on a member's small keys.
-- Arguments go in slices: Lua's unpack is limited to a few thousand values.
local SLICE = 1000
local function write_all(cmd, key, args)
  for a = 1, #args, SLICE do
    redis.call(cmd, key, unpack(args, a, math.min(a + SLICE - 1, #args)))
  end
end
local function hmget_all(key, fields)
  local out = {}
  for a = 1, #fields, SLICE do
    local got = redis.call('HMGET', key, unpack(fields, a, math.min(a + SLICE - 1, #fields)))
    for _, v in ipairs(got) do out[#out + 1] = v end
  end
  return out
end
local cands = {}
for i = 5, #ARGV, 3 do cands[#cands + 1] = ARGV[i] end
local states = hmget_all(KEYS[1], cands)
local stored = hmget_all(KEYS[2], cands)
-- The as_of each candidate holds so far in this call (a candidate may repeat when coalescing is
-- off: each repeat is guarded against the one before it).
local held = {}
local as_of_args, score_args = {}, {}
for j = 1, #cands do
  local i = 5 + (j - 1) * 3
  local cand, score, asof = cands[j], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cur = states[j]
  -- Tombstones are serialised with "rm":true (see PairState); a plain find is much cheaper
  -- than decoding the JSON for every score.
  if (not cur) or string.find(cur, '"rm":true', 1, true) then
    flags[#flags + 1] = {-1, '0'}
  else
    local sa_str = held[cand] or stored[j]
    if sa_str == false then sa_str = nil end
    local sa = tonumber(sa_str or '-1')
    if asof >= sa then
      held[cand] = ARGV[i + 2]
      as_of_args[#as_of_args + 1] = cand
      as_of_args[#as_of_args + 1] = ARGV[i + 2]
      score_args[#score_args + 1] = score
      score_args[#score_args + 1] = cand
      written = written + 1
      if asof > max_asof then max_asof = asof; max_asof_str = ARGV[i + 2] end
      flags[#flags + 1] = {1, ARGV[i + 2]}
    else
      flags[#flags + 1] = {0, sa_str}
    end
  end
end
if written > 0 then
  local ttl = tonumber(ARGV[3])
  local n = tonumber(ARGV[2])
  -- The top N, kept incrementally: the written scores go in, the lowest beyond N go out. That set
  -- is exactly the N best of all scores unless a score in it fell below one outside it; the
  -- check (as many entries as there should be, and its lowest is the N-th best of all) catches
  -- that, and only then is the set rebuilt. Rebuilding on every write (ZRANGESTORE, or COPY of
  -- a few hundred entries) costs 100-400 us per call; this costs a few us.
  write_all('HSET', KEYS[2], as_of_args)
  write_all('ZADD', KEYS[3], score_args)
  write_all('ZADD', KEYS[4], score_args)
  local card = redis.call('ZCARD', KEYS[4])
  if card > n then
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, card - n - 1)
    card = n
  end
  local k = math.min(n, redis.call('ZCARD', KEYS[3]))
  local lowest = redis.call('ZRANGE', KEYS[4], 0, 0)
  local kth = redis.call('ZREVRANGE', KEYS[3], k - 1, k - 1)
  if card ~= k or lowest[1] ~= kth[1] then
    redis.call('ZRANGESTORE', KEYS[4], KEYS[3], 0, n - 1, 'REV')
  end
  redis.call('PEXPIRE', KEYS[4], ttl)
  local cur_asof = tonumber(redis.call('HGET', KEYS[5], 'as_of') or '-1')
  if max_asof > cur_asof then redis.call('HSET', KEYS[5], 'as_of', max_asof_str) end
  redis.call('HSET', KEYS[5], 'model', ARGV[1], 'updated_at', ARGV[4])
  redis.call('PEXPIRE', KEYS[5], ttl)
end
return flags
