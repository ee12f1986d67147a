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

#: KEYS: task stream, then the dedup key of each task.  ARGV: dedup ttl (s), then for
#: each task the number of its entry's fields and values, and those.
#: Queues the tasks in one call (a client's batch: one round trip for many
#: submits).  Returns, per task, its new entry id, or nil when its task id was
#: already submitted (an earlier batch, or earlier in this one).
SUBMIT: Final = """
local out, a = {}, 2
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  if redis.call('SET', KEYS[i], '', 'NX', 'EX', ARGV[1]) then
    local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, a + 1, a + n))
    redis.call('SET', KEYS[i], id, 'KEEPTTL')
    out[i - 1] = id
  else
    out[i - 1] = false
  end
  a = a + n + 1
end
return out
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

#: KEYS: task stream, then the result stream of each task's client (repeated when
#: tasks share a client).  ARGV: group, consumer, result maxlen, result ttl (s),
#: then for each task its entry id, the number of its result's fields and
#: values, and those.
#: For each task, in order: publishes the result, acks and deletes the entry,
#: and answers 1; answers 0 and does nothing when the consumer no longer owns
#: the entry (a batch naming one entry twice publishes it once).  One call
#: completes a supervisor's whole batch of finished tasks.
COMPLETE: Final = (
    _OWNER_OF
    + """
local group, me, out, a, fresh = ARGV[1], ARGV[2], {}, 5, {}
for i = 2, #KEYS do
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  if owner_of(KEYS[1], group, id) == me then
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, a + 2, a + 1 + n))
    if not fresh[KEYS[i]] then
      redis.call('EXPIRE', KEYS[i], ARGV[4])
      fresh[KEYS[i]] = true
    end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    out[i - 1] = 1
  else
    out[i - 1] = 0
  end
  a = a + n + 2
end
return out
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

_CLAIM_FN: Final = """
local function claim(stream, group, me, min_idle, maxd, want, budget, only, mine)
  local out, taken, start = {}, 0, '-'
  while budget > 0 do
    local page = math.min(budget, 100)
    local args = {'XPENDING', stream, group, 'IDLE', min_idle, start, '+', page}
    if only ~= '' then args[#args + 1] = only end
    local pending = redis.call(unpack(args))
    for _, p in ipairs(pending) do
      local id, owner, deliveries = p[1], p[2], p[4]
      if owner ~= me or mine then
        if deliveries >= maxd then
          redis.call('XCLAIM', stream, group, me, 0, id, 'JUSTID')
          local e = redis.call('XRANGE', stream, id, id)
          out[#out + 1] = {'dead', id, deliveries, e[1] and e[1][2] or {}, owner}
        elseif taken < want then
          local got = redis.call('XCLAIM', stream, group, me, 0, id)
          if got[1] and got[1][2] then
            taken = taken + 1
            out[#out + 1] = {'task', id, deliveries + 1, got[1][2], owner}
          else
            -- deleted while pending (not by this protocol): nothing is left to run
            redis.call('XACK', stream, group, id)
          end
        end
      end
    end
    budget = budget - #pending
    if #pending < page then break end
    start = '(' .. pending[#pending][1]
  end
  return out, taken
end
"""

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
CLAIM: Final = (
    _CLAIM_FN
    + """
local out = claim(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
                  ARGV[7], ARGV[8] == '1')
return out
"""
)

#: KEYS: task stream.
#: ARGV: group, consumer, how many to take, max deliveries, the placeholder
#: consumer of released entries, how many of them to look at, the prefix of
#: the app's dedup keys (``pf:{app}:dedup:``).
#: A supervisor's fetch in one call: released entries first (as CLAIM with
#: min idle 0 and only the placeholder), then new ones (XREADGROUP without
#: BLOCK, which a script cannot do), up to the count.  Each row is ``{kind,
#: id, deliveries, fields, previous owner, verdict}``, kind ``task``
#: (released), ``new`` or ``dead``, and the verdict a first, read-only look at
#: admission (see ADMIT) made from the entry's unverified ``id`` and
#: ``expires``: ``ok`` (the task's dedup key names this entry, and it has not
#: expired by the server's clock; the key is kept until the expiry), ``replay``,
#: ``expired``, or ``unclaimed`` (no dedup key, or fields it cannot read): the
#: caller runs ADMIT for those once their signatures are checked, since only a
#: signed entry may take a task id.  The dedup keys are named from the prefix,
#: not passed in KEYS: they share the stream's hash tag, so its Cluster slot.
#: The reply starts with the id to wait after for new entries: when XREADGROUP
#: found fewer than asked (no new entry is left), the newest entry's id (or
#: ``0-0``), else the empty string.
FETCH: Final = (
    _CLAIM_FN
    + """
local group, me, want, maxd = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function verdict(id, fields)
  local tid, exp
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'id' then tid = fields[i + 1] elseif fields[i] == 'expires' then exp = tonumber(fields[i + 1]) end
  end
  if not tid or not exp then return 'unclaimed' end
  local key = ARGV[7] .. tid
  local holder = redis.call('GET', key)
  if holder and holder ~= id then return 'replay' end
  if exp <= now then return 'expired' end
  if not holder then return 'unclaimed' end
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and now + ttl < exp then redis.call('PEXPIREAT', key, exp) end
  return 'ok'
end
local out, taken = claim(KEYS[1], group, me, 0, maxd, want, tonumber(ARGV[6]), ARGV[5], false)
for _, row in ipairs(out) do
  row[6] = row[1] == 'task' and verdict(row[2], row[4]) or ''
end
local after = ''
if taken < want then
  local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want - taken, 'STREAMS', KEYS[1], '>')
  local new = got and got[1][2] or {}
  for _, e in ipairs(new) do
    out[#out + 1] = {'new', e[1], 1, e[2], '', verdict(e[1], e[2])}
  end
  if #new < want - taken then
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    after = last[1] and last[1][1] or '0-0'
  end
end
table.insert(out, 1, after)
return out
"""
)

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
