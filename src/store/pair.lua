-- Upsert or remove one pair, last-writer-wins by (ts, offset); a removal leaves a tombstone so an
-- older upsert arriving later cannot bring the pair back.
-- KEYS[1] pairs hash, KEYS[2] scored-as_of hash, KEYS[3] rest zset (scored candidates outside the
-- top N), KEYS[4] top-N zset
-- ARGV[1] candidate, ARGV[2] ts, ARGV[3] offset, ARGV[4] state JSON, ARGV[5] "remove"|"upsert",
-- ARGV[6] top N.  Returns 1 applied, 0 stale.
local cand = ARGV[1]
local ts = tonumber(ARGV[2])
local off = tonumber(ARGV[3])
local cur = redis.call('HGET', KEYS[1], cand)
if cur then
  local st = cjson.decode(cur)
  if st.ts > ts or (st.ts == ts and st.o > off) then return 0 end
end
redis.call('HSET', KEYS[1], cand, ARGV[4])
if ARGV[5] == 'remove' then
  -- KEYS[2] keeps the pair's as_of: a pair added again later never scores as of an earlier time.
  redis.call('ZREM', KEYS[3], cand)
  local ttl = redis.call('PTTL', KEYS[4])
  if redis.call('ZREM', KEYS[4], cand) == 1 then
    -- The best of the rest takes the freed place (the rest ranks below every top entry).
    local back = redis.call('ZPOPMAX', KEYS[3], 1)
    if back[1] then
      redis.call('ZADD', KEYS[4], back[2], back[1])
      if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
    end
  end
end
return 1
