-- Write a member's new scores, each guarded by event time: a score computed as of an earlier time
-- never replaces one computed as of a later time. Then refresh the top-N set, its TTL and meta.
-- KEYS[1] pairs hash, KEYS[2] scored-as_of hash, KEYS[3] rest zset (scored candidates outside the
-- top N), KEYS[4] top-N zset,
-- KEYS[5] meta hash
-- ARGV[1] model, ARGV[2] top N, ARGV[3] ttl ms, ARGV[4] now ms, then candidate, score, as_of...
-- Returns the candidates not written, flat: position (1-based), flag, as_of for each: 0 with the
-- stored as_of when a later score is already there, -1 with '0' when the pair is gone (removed or
-- never stored). Every other candidate was written as of its own as_of. (A flat reply of the
-- exceptions: a table per candidate cost as much as the guard reads.)
local flags = {}
local function skip(j, flag, asof)
  flags[#flags + 1] = j
  flags[#flags + 1] = flag
  flags[#flags + 1] = asof
end
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
local function read_all(cmd, key, fields)
  local out = {}
  for a = 1, #fields, SLICE do
    local got = redis.call(cmd, key, unpack(fields, a, math.min(a + SLICE - 1, #fields)))
    for k = 1, #got do out[#out + 1] = got[k] end
  end
  return out
end
local cands = {}
for i = 5, #ARGV, 3 do cands[#cands + 1] = ARGV[i] end
local states = read_all('HMGET', KEYS[1], cands)
local stored = read_all('HMGET', KEYS[2], cands)
-- The as_of each candidate holds so far in this call (a candidate may repeat when coalescing is
-- off: each repeat is guarded against the one before it).
local held = {}
local as_of_args = {}
-- The last written score of each candidate, in first-written order.
local order, last = {}, {}
for j = 1, #cands do
  local i = 5 + (j - 1) * 3
  local cand, score, asof = cands[j], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cur = states[j]
  -- Tombstones are serialised with "rm":true (see PairState); a plain find is much cheaper
  -- than decoding the JSON for every score.
  if (not cur) or string.find(cur, '"rm":true', 1, true) then
    skip(j, -1, '0')
  else
    local sa_str = held[cand] or stored[j]
    if sa_str == false then sa_str = nil end
    local sa = tonumber(sa_str or '-1')
    if asof >= sa then
      held[cand] = ARGV[i + 2]
      as_of_args[#as_of_args + 1] = cand
      as_of_args[#as_of_args + 1] = ARGV[i + 2]
      if not last[cand] then order[#order + 1] = cand end
      last[cand] = score
      written = written + 1
      if asof > max_asof then max_asof = asof; max_asof_str = ARGV[i + 2] end
    else
      skip(j, 0, sa_str)
    end
  end
end

-- Does (score a, member a) rank above (score b, member b) in ZREVRANGE order: higher score, then
-- the greater member by bytes?
local function above(sa, ma, sb, mb)
  local x, y = tonumber(sa), tonumber(sb)
  if x ~= y then return x > y end
  local n = math.min(#ma, #mb)
  for k = 1, n do
    local p, q = string.byte(ma, k), string.byte(mb, k)
    if p ~= q then return p > q end
  end
  return #ma > #mb
end

-- ZPOPMIN/ZPOPMAX replies (member, score, ...) as ZADD arguments (score, member, ...).
local function as_zadd(popped)
  local out = {}
  for k = 1, #popped, 2 do
    out[#out + 1] = popped[k + 1]
    out[#out + 1] = popped[k]
  end
  return out
end

if written > 0 then
  local ttl = tonumber(ARGV[3])
  local n = tonumber(ARGV[2])
  write_all('HSET', KEYS[2], as_of_args)
  -- Every scored candidate is in exactly one of two sets: the top N (the output) and the rest.
  -- A written score goes to the set it belongs in by the top's lowest entry before this call, so
  -- most writes touch one small set once; the top is then topped up or trimmed to N and, when a
  -- lowered score left the top's lowest below the rest's highest, entries are swapped in one move
  -- so that the top is exactly the N best of all (as ZREVRANGE orders them).
  local in_top = read_all('ZMSCORE', KEYS[4], order)
  -- A top short of N means the rest is empty (or N was raised): then everything goes to the top.
  local card0 = redis.call('ZCARD', KEYS[4])
  local card = card0
  -- The top's lowest entry routes candidates not in the top; with every one in the top already
  -- (most candidate fan-outs), or the top short of N, it is not needed.
  local lo = {}
  if card0 >= n then
    for j = 1, #order do
      if not in_top[j] then
        lo = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
        break
      end
    end
  end
  local to_top, to_rest, leave_rest = {}, {}, {}
  -- A top entry whose score went down may now rank below one in the rest: only then (or after N
  -- was raised, below) can the sets be out of order after routing (everything routed to the rest
  -- ranks below the top's lowest entry before this call, and trimming and topping up move the
  -- right ends).
  local lowered = 0
  -- Candidates sent to a top short of N without a comparison: out of place only when the rest is
  -- not empty (N was raised).
  local blind = 0
  for j, cand in ipairs(order) do
    local score = last[cand]
    if in_top[j] then
      if tonumber(score) < tonumber(in_top[j]) then lowered = lowered + 1 end
      to_top[#to_top + 1] = score
      to_top[#to_top + 1] = cand
    elseif card0 < n or (lo[1] and above(score, cand, lo[2], lo[1])) then
      to_top[#to_top + 1] = score
      to_top[#to_top + 1] = cand
      leave_rest[#leave_rest + 1] = cand
      card = card + 1
      if card0 < n then blind = blind + 1 end
    else
      to_rest[#to_rest + 1] = score
      to_rest[#to_rest + 1] = cand
    end
  end
  if #to_top > 0 then write_all('ZADD', KEYS[4], to_top) end
  local rest_written = #to_rest > 0
  if rest_written then write_all('ZADD', KEYS[3], to_rest) end
  local unsure = lowered
  if #leave_rest > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
    write_all('ZREM', KEYS[3], leave_rest)
    unsure = unsure + blind
  end
  if card > n then
    write_all('ZADD', KEYS[3], as_zadd(redis.call('ZPOPMIN', KEYS[4], card - n)))
    rest_written = true
  elseif card < n then
    local back = redis.call('ZPOPMAX', KEYS[3], n - card)
    if #back > 0 then write_all('ZADD', KEYS[4], as_zadd(back)) end
  end
  -- Only a lowered top entry (or one sent to the top blind) can rank below one in the rest, so at
  -- most `unsure` entries are out of place: the rest's best `unsure` entries at or above the top's
  -- lowest score move to the top and as many of the top's lowest go back. The top and the moved
  -- entries hold the N best of all, so popping the lowest leaves the top exact, in a fixed number
  -- of calls however many move.
  if unsure > 0 then
    local low = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    if low[1] then
      local high = redis.call('ZRANGE', KEYS[3], '+inf', low[2], 'BYSCORE', 'REV', 'LIMIT', 0,
        unsure, 'WITHSCORES')
      if #high > 0 then
        local moved = {}
        for k = 1, #high, 2 do moved[#moved + 1] = high[k] end
        write_all('ZADD', KEYS[4], as_zadd(high))
        write_all('ZREM', KEYS[3], moved)
        write_all('ZADD', KEYS[3], as_zadd(redis.call('ZPOPMIN', KEYS[4], #moved)))
      end
    end
  end
  -- The member's keys expire together, ttl after their TTL was last set (meta's ttl_set_at):
  -- a member who does not come back stops costing memory. Setting it on every write would cost
  -- three calls a member (as much as the rest of a one-pair write), so it is set again once
  -- ttl/64 has passed, and a key this call made (or wrote to, for the rest set) gets the same
  -- remaining time.
  local meta = redis.call('HMGET', KEYS[5], 'as_of', 'ttl_set_at')
  local now = tonumber(ARGV[4])
  local cur_asof = tonumber(meta[1] or '-1')
  local ttl_set = tonumber(meta[2] or '-1')
  local refresh = ttl_set < 0 or now < ttl_set or now - ttl_set >= ttl / 64
  local fields = {'model', ARGV[1], 'updated_at', ARGV[4]}
  if max_asof > cur_asof then
    fields[#fields + 1] = 'as_of'
    fields[#fields + 1] = max_asof_str
  end
  if refresh then
    fields[#fields + 1] = 'ttl_set_at'
    fields[#fields + 1] = ARGV[4]
    redis.call('PEXPIRE', KEYS[4], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  else
    local left = math.max(1, ttl - (now - ttl_set))
    if card0 == 0 then redis.call('PEXPIRE', KEYS[4], left) end
    if rest_written then redis.call('PEXPIRE', KEYS[3], left) end
  end
  redis.call('HSET', KEYS[5], unpack(fields))
  if refresh then redis.call('PEXPIRE', KEYS[5], ttl) end
end
return flags
