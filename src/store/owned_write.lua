-- Apply members' windows of plain writes, each fenced by its owner's generation: nothing is read
-- of a member's state, the owner holds it. One call covers several members on a single Redis (one
-- on a cluster, where a call stays in one slot).
-- KEYS, 8 per member: owner generation (string), then the member's keys (pairs, as_of, features,
-- versions, top, rest, meta).
-- ARGV, per member: the writer's generation, the number of commands, then each command: key
-- index (1 to 8, into the member's KEYS), command name, argument count, arguments...
-- Returns per member 1 when applied, 0 when a later owner has taken it (nothing written for it).
local out = {}
local i = 1
local j = 0
while i <= #ARGV do
  j = j + 1
  local b = (j - 1) * 8
  local g = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  local cur = tonumber(redis.call('GET', KEYS[b + 1]) or '0')
  local ok = cur <= g
  if ok and cur < g then redis.call('SET', KEYS[b + 1], ARGV[i - 2]) end
  for _ = 1, n do
    local k, cmd, c = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
    if ok then redis.call(cmd, KEYS[b + k], unpack(ARGV, i + 3, i + 2 + c)) end
    i = i + 3 + c
  end
  out[j] = ok and 1 or 0
end
return out
