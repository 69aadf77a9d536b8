-- Apply one member's window of plain writes, fenced by its owner's generation: nothing is read of
-- the member's state, the owner holds it.
-- KEYS[1] owner generation (string), then the member's keys.
-- ARGV[1] the writer's generation, then commands: key index (into KEYS), command name, argument
-- count, arguments...
-- Returns 1 when applied, 0 when a later owner has taken the member (nothing is written).
local g = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur > g then return 0 end
if cur < g then redis.call('SET', KEYS[1], ARGV[1]) end
local i = 2
local n = #ARGV
while i <= n do
  local k, cmd, c = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call(cmd, KEYS[k], unpack(ARGV, i + 3, i + 2 + c))
  i = i + 3 + c
end
return 1
