"""The Lua scripts of the protocol (v2), one per step that must be atomic.

Every key a script touches is passed in KEYS, and all keys of one app share
the hash tag ``{<app>}``, so each script runs on one Redis Cluster slot.

The ownership test shared by renew, complete, release and dead-lettering is
``XPENDING <stream> <group> <id> <id> 1``: the pending entry's consumer must
be the caller.  Redis runs a script to the end before any other command, so
nothing can claim the entry between that test and what the script does next.
"""

from __future__ import annotations

from typing import Final

_OWNER_OF: Final = """
local function owner_of(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] then return p[1][2] end
  return nil
end
"""

#: KEYS: dedup key, task stream.  ARGV: dedup ttl (s), then the entry's fields and values.
#: Returns the new entry id, or nil when the task id was already submitted.
SUBMIT: Final = """
if not redis.call('SET', KEYS[1], '', 'NX', 'EX', ARGV[1]) then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[1], id, 'KEEPTTL')
return id
"""

#: KEYS: the dedup key of each task.  ARGV: for each task, its entry id and its
#: expiry (ms since the epoch, from the signed ``expires`` field).
#: Admits the tasks a consumer was delivered, before it runs any: returns one
#: verdict per task, ``ok``, ``replay`` (the task id belongs to another entry:
#: the same signed task added to the stream again) or ``expired`` (by the
#: server's clock, one clock for every host).  An admitted task's key names its
#: entry until the task expires at least, so a copy added later is a replay.
ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local entry, expires = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= entry then
    out[i] = 'replay'
  elseif expires <= now then
    out[i] = 'expired'
  else
    if not holder then
      redis.call('SET', KEYS[i], entry, 'PXAT', expires)
    else
      local ttl = redis.call('PTTL', KEYS[i])
      if ttl >= 0 and now + ttl < expires then redis.call('PEXPIREAT', KEYS[i], expires) end
    end
    out[i] = 'ok'
  end
end
return out
"""

#: KEYS: task stream, this consumer's alive key.
#: ARGV: group, consumer, alive ttl (ms), entry ids...
#: Resets the idle time of the entries the consumer still owns (XCLAIM JUSTID
#: leaves the delivery count alone) and returns the ids it no longer owns.
RENEW: Final = (
    _OWNER_OF
    + """
redis.call('SET', KEYS[2], #ARGV - 3, 'PX', ARGV[3])
local lost = {}
for i = 4, #ARGV do
  if owner_of(KEYS[1], ARGV[1], ARGV[i]) == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""
)

#: KEYS: task stream, the client's result stream.
#: ARGV: group, consumer, entry id, result maxlen, result ttl (s), then the result's fields and values.
#: Publishes the result, acks and deletes the entry, and returns 1; returns 0
#: and does nothing when the consumer no longer owns the entry.
COMPLETE: Final = (
    _OWNER_OF
    + """
if owner_of(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

#: KEYS: task stream.  ARGV: group, consumer, entry id, placeholder consumer.
#: Hands an owned entry to the placeholder consumer with its delivery time at
#: the epoch (TIME 0), so the next fetch or reap of any consumer claims it
#: without waiting for the lease; JUSTID leaves the delivery count as it is.
RELEASE: Final = (
    _OWNER_OF
    + """
if owner_of(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[3], 'TIME', 0, 'JUSTID')
return 1
"""
)

#: KEYS: task stream.
#: ARGV: group, consumer, min idle (ms), max deliveries, how many to claim to
#: run, how many pending entries to look at, only this owner ('' = any),
#: also the caller's own entries ('1') or not ('').
#: Looks at pending entries idle for at least min idle.  The caller's own are
#: included when asked: a consumer renews every entry it runs, so its own entry
#: idle for a lease is one it never saw (a delivery whose reply was lost with
#: the connection) or stopped tracking; nobody else would ever take it.
#: An entry delivered max-deliveries times already is claimed (JUSTID, count
#: unchanged) to be dead-lettered; otherwise it is claimed to run (the count
#: goes up by one) while fewer than asked have been.  Returns one
#: ``{kind, id, deliveries, fields, previous owner}`` per entry, kind ``task``
#: or ``dead``.
CLAIM: Final = """
local group, me = ARGV[1], ARGV[2]
local maxd, want, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out, taken, start = {}, 0, '-'
while budget > 0 do
  local page = math.min(budget, 100)
  local args = {'XPENDING', KEYS[1], group, 'IDLE', ARGV[3], start, '+', page}
  if ARGV[7] ~= '' then args[#args + 1] = ARGV[7] end
  local pending = redis.call(unpack(args))
  for _, p in ipairs(pending) do
    local id, owner, deliveries = p[1], p[2], p[4]
    if owner ~= me or ARGV[8] == '1' then
      if deliveries >= maxd then
        redis.call('XCLAIM', KEYS[1], group, me, 0, id, 'JUSTID')
        local e = redis.call('XRANGE', KEYS[1], id, id)
        out[#out + 1] = {'dead', id, deliveries, e[1] and e[1][2] or {}, owner}
      elseif taken < want then
        local got = redis.call('XCLAIM', KEYS[1], group, me, 0, id)
        if got[1] and got[1][2] then
          taken = taken + 1
          out[#out + 1] = {'task', id, deliveries + 1, got[1][2], owner}
        else
          -- deleted while pending (not by this protocol): nothing is left to run
          redis.call('XACK', KEYS[1], group, id)
        end
      end
    end
  end
  budget = budget - #pending
  if #pending < page then break end
  start = '(' .. pending[#pending][1]
end
return out
"""

#: KEYS: task stream, dead-letter stream, the client's result stream.
#: ARGV: group, consumer, entry id, dead maxlen, result maxlen, result ttl (s),
#: n, n dead-letter fields and values, then the result's fields and values
#: (none: publish no result).  Copies the entry with the dead-letter fields
#: added to the dead-letter stream, publishes the result, acks and deletes the
#: entry; returns 0 and does nothing when the caller does not own the entry.
DEAD_LETTER: Final = (
    _OWNER_OF
    + """
if owner_of(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local fields = entry[1] and entry[1][2] or {}
if #fields > 256 then fields = {'truncated', #fields} end
local n = tonumber(ARGV[7])
for i = 8, 7 + n do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
if #ARGV > 7 + n then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 8 + n))
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

#: KEYS: task stream, then the alive key of each candidate.  ARGV: group, then
#: the candidates' names (in the order of their keys).  Deletes from the group
#: each candidate whose alive key has expired and that holds no entry, and
#: returns how many it deleted.  (XGROUP DELCONSUMER drops a consumer's pending
#: entries, so the "holds none" test must be in the same script.)
FORGET: Final = """
local gone = 0
for i = 2, #KEYS do
  local name = ARGV[i]
  if redis.call('EXISTS', KEYS[i]) == 0
      and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone = gone + 1
  end
end
return gone
"""
