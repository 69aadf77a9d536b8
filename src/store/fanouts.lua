-- Fan-out intents of one input partition: candidate -> the event time its fan-out must reach.
-- Recorded before a candidate update's offset is stored (so the message can be committed while
-- its fan-out waits or runs), cleared when the fan-out has written its last chunk. A later
-- update's intent is never lowered or cleared by an earlier fan-out.
-- KEYS[1] intents hash; ARGV[1] 'set' or 'clear', then candidate, ts pairs.
local set = ARGV[1] == 'set'
for i = 2, #ARGV, 2 do
  local cand, ts = ARGV[i], tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('HGET', KEYS[1], cand) or '-1')
  if set then
    if ts > cur then redis.call('HSET', KEYS[1], cand, ARGV[i + 1]) end
  elseif cur >= 0 and cur <= ts then
    redis.call('HDEL', KEYS[1], cand)
  end
end
return 0
