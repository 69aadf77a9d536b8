-- Fan-out intents of one input partition: candidate -> "ts:offset", the event time its fan-out
-- must reach and the highest offset of the partition's updates it covers. Recorded before a
-- candidate update's offset is stored (so the message can be committed while its fan-out waits or
-- runs), cleared when a fan-out that took in every update up to that offset has written its last
-- chunk. Offsets, not event times, decide what a fan-out covers: an update with an equal or older
-- ts that arrives after a fan-out started is covered only by the next run.
-- KEYS[1] intents hash; ARGV[1] 'set' or 'clear', then triples candidate, ts, offset ('clear'
-- ignores ts).
local set = ARGV[1] == 'set'
for i = 2, #ARGV, 3 do
  local cand, ts, off = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local cur = redis.call('HGET', KEYS[1], cand)
  local cts, coff = -1, -1
  if cur then
    local sep = string.find(cur, ':', 1, true)
    cts, coff = tonumber(string.sub(cur, 1, sep - 1)), tonumber(string.sub(cur, sep + 1))
  end
  if set then
    if off > coff or ts > cts then
      redis.call('HSET', KEYS[1], cand, string.format('%d:%d', math.max(ts, cts), math.max(off, coff)))
    end
  elseif cur and coff <= off then
    redis.call('HDEL', KEYS[1], cand)
  end
end
return 0
