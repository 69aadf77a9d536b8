-- Per-feature last-writer-wins merge of a partial update.
-- KEYS[1] values hash, KEYS[2] versions hash ("ts:offset" per feature)
-- ARGV[1] ts, ARGV[2] offset, then name, value pairs; an empty value removes the feature.
-- Returns {applied, stale}. Equal (ts, offset) re-applies, so a replay is idempotent.
local ts = tonumber(ARGV[1])
local off = tonumber(ARGV[2])
local version = ARGV[1] .. ':' .. ARGV[2]
local applied, stale = 0, 0
for i = 3, #ARGV, 2 do
  local name, val = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[2], name)
  local newer = true
  if cur then
    local sep = string.find(cur, ':', 1, true)
    local cts = tonumber(string.sub(cur, 1, sep - 1))
    local coff = tonumber(string.sub(cur, sep + 1))
    if cts > ts or (cts == ts and coff > off) then newer = false end
  end
  if newer then
    redis.call('HSET', KEYS[2], name, version)
    if val == '' then
      redis.call('HDEL', KEYS[1], name)
    else
      redis.call('HSET', KEYS[1], name, val)
    end
    applied = applied + 1
  else
    stale = stale + 1
  end
end
return {applied, stale}
