"""Lua scripts for every job state change, so each one is a single atomic check-and-set in Redis.

A job moves ``queued → running → succeeded|failed|canceled|expired`` (and ``running → queued`` when a
draining worker hands it back). Only the first transition into a terminal state writes: a second
completion of the same job (a redelivered copy, a stalled worker waking up) finds a terminal state and
changes nothing. The scripts also keep the queued counters and the job's event log in step with the state.
Single-instance Redis only: some keys are derived inside the scripts (not Redis Cluster safe).
"""

from __future__ import annotations

# Shared helper: leave the queued state (counters) and append an event.
_COMMON = """
local function leave_queued(state, total_key, variant_key)
  if state == "queued" then
    redis.call("DECR", total_key)
    redis.call("DECR", variant_key)
  end
end
local function event(events_key, kind, data)
  return redis.call("XADD", events_key, "MAXLEN", "~", "1000", "*", "type", kind, "data", data)
end
-- queued|running → a terminal state, once; returns 1 when this call wrote it
local function finish(job_key, events_key, total_key, variant_key, new_state, now, result, err, ttl, worker)
  local state = redis.call("HGET", job_key, "state")
  if state ~= "queued" and state ~= "running" then return 0 end
  leave_queued(state, total_key, variant_key)
  redis.call("HSET", job_key, "state", new_state, "finished_at", now)
  if result ~= "" then redis.call("HSET", job_key, "result", result) end
  if err ~= "" then redis.call("HSET", job_key, "error", err) end
  if worker ~= "" then redis.call("HSET", job_key, "worker_id", worker) end
  redis.call("HINCRBY", job_key, "completions", 1)
  event(events_key, new_state, "{}")
  redis.call("EXPIRE", job_key, ttl)
  redis.call("EXPIRE", events_key, ttl)
  return 1
end
"""

# KEYS: job, stream, events, queued_total, queued_variant, idempotency (may be unused)
# ARGV: job_id, static_json, capacity, now, deadline|"", stream_maxlen, use_idem, request_hash, idem_ttl,
#       model, variant, job_key_prefix, variant_capacity|""
SUBMIT = (
    _COMMON
    + """
if redis.call("EXISTS", KEYS[1]) == 1 then  -- a replayed call (client retry): it already happened
  return {"ok", redis.call("HGET", KEYS[1], "entry_id") or ""}
end
if ARGV[7] == "1" then
  local existing = redis.call("HMGET", KEYS[6], "job_id", "request_hash")
  if existing[1] and redis.call("EXISTS", ARGV[12] .. existing[1]) == 1 then
    return {"exists", existing[1], existing[2] or ""}
  end
end
local depth = tonumber(redis.call("GET", KEYS[4]) or "0")
if depth >= tonumber(ARGV[3]) then
  return {"full", tostring(depth), ""}
end
if ARGV[13] ~= "" then
  local mine = tonumber(redis.call("GET", KEYS[5]) or "0")
  if mine >= tonumber(ARGV[13]) then
    return {"full", tostring(mine), "variant"}
  end
end
local entry = redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[6], "*", "job_id", ARGV[1])
redis.call("HSET", KEYS[1], "state", "queued", "job", ARGV[2], "created_at", ARGV[4], "deadline_at", ARGV[5],
           "attempts", "0", "entry_id", entry, "completions", "0", "cancel_requested", "0",
           "model", ARGV[10], "variant", ARGV[11])
redis.call("INCR", KEYS[4])
redis.call("INCR", KEYS[5])
event(KEYS[3], "queued", "{}")
if ARGV[7] == "1" then
  redis.call("HSET", KEYS[6], "job_id", ARGV[1], "request_hash", ARGV[8])
  redis.call("EXPIRE", KEYS[6], ARGV[9])
end
return {"ok", entry}
"""
)

# KEYS: job, events, queued_total, queued_variant
# ARGV: worker_id, now, entry_id, ttl
START = (
    _COMMON
    + """
local f = redis.call("HMGET", KEYS[1], "state", "entry_id", "cancel_requested", "deadline_at")
local state = f[1]
if not state then return {"missing"} end
if state ~= "queued" and state ~= "running" then return {"terminal", state} end
if f[2] ~= ARGV[3] then return {"stale", state} end
local function stop(new_state, message)
  leave_queued(state, KEYS[3], KEYS[4])
  redis.call("HSET", KEYS[1], "state", new_state, "finished_at", ARGV[2],
             "error", cjson.encode({reason = new_state, message = message}))
  redis.call("HINCRBY", KEYS[1], "completions", 1)
  event(KEYS[2], new_state, "{}")
  redis.call("EXPIRE", KEYS[1], ARGV[4])
  redis.call("EXPIRE", KEYS[2], ARGV[4])
end
if f[3] == "1" then
  stop("canceled", "canceled before it started")
  return {"canceled"}
end
if f[4] and f[4] ~= "" and tonumber(ARGV[2]) > tonumber(f[4]) then
  stop("expired", "its deadline passed before a worker could start it")
  return {"expired"}
end
leave_queued(state, KEYS[3], KEYS[4])
redis.call("HSET", KEYS[1], "state", "running", "worker_id", ARGV[1], "started_at", ARGV[2], "heartbeat_at", ARGV[2])
redis.call("HDEL", KEYS[1], "progress_step", "progress_total")
local attempts = redis.call("HINCRBY", KEYS[1], "attempts", 1)
event(KEYS[2], "started", cjson.encode({worker_id = ARGV[1], attempt = attempts}))
return {"started", tostring(attempts)}
"""
)

# KEYS: job, events, queued_total, queued_variant
# ARGV: new_state, now, result_json|"", error_json|"", ttl, worker_id|""
FINISH = (
    _COMMON
    + """
return finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""
)

# KEYS: job, events, queued_total, queued_variant
# ARGV: now, error_json, ttl.  Fails a job only while it waits (nobody serves its variant); a running one is left.
FAIL_QUEUED = (
    _COMMON
    + """
if redis.call("HGET", KEYS[1], "state") ~= "queued" then return 0 end
return finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], "failed", ARGV[1], "", ARGV[2], ARGV[3], "")
"""
)

# KEYS: job, events, queued_total, queued_variant, stream, dlq
# ARGV: group, entry_id, job_id, model, variant, deliveries, reason, now, error_json, ttl, dlq_maxlen
# Dead-lettering in one step: the DLQ record, the job's failure and the acknowledgement happen together or not
# at all (a crash between them would leave a failed job pending, or a pending job already in the DLQ).
DEAD_LETTER = (
    _COMMON
    + """
redis.call("XADD", KEYS[6], "MAXLEN", "~", ARGV[11], "*", "job_id", ARGV[3], "model", ARGV[4],
           "variant", ARGV[5], "entry_id", ARGV[2], "deliveries", ARGV[6], "reason", ARGV[7], "at", ARGV[8])
local written = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], "failed", ARGV[8], "", ARGV[9], ARGV[10], "")
redis.call("XACK", KEYS[5], ARGV[1], ARGV[2])
return written
"""
)

# KEYS: job, events, queued_total, queued_variant, stream
# ARGV: now, ttl
CANCEL = (
    _COMMON
    + """
local f = redis.call("HMGET", KEYS[1], "state", "entry_id")
local state = f[1]
if not state then return {"missing"} end
if state == "queued" then
  leave_queued(state, KEYS[3], KEYS[4])
  redis.call("HSET", KEYS[1], "state", "canceled", "finished_at", ARGV[1],
             "error", cjson.encode({reason = "canceled", message = "canceled while queued"}))
  redis.call("HINCRBY", KEYS[1], "completions", 1)
  event(KEYS[2], "canceled", "{}")
  redis.call("EXPIRE", KEYS[1], ARGV[2])
  redis.call("EXPIRE", KEYS[2], ARGV[2])
  if f[2] then redis.call("XDEL", KEYS[5], f[2]) end
  return {"canceled"}
end
if state == "running" then
  if redis.call("HGET", KEYS[1], "cancel_requested") ~= "1" then
    redis.call("HSET", KEYS[1], "cancel_requested", "1")
    event(KEYS[2], "cancel_requested", "{}")
  end
  return {"cancel_requested"}
end
return {"terminal", state}
"""
)

# KEYS: job, stream, events, queued_total, queued_variant
# ARGV: worker_id, old_entry_id, stream_maxlen, job_id
RELEASE = (
    _COMMON
    + """
local f = redis.call("HMGET", KEYS[1], "state", "worker_id", "entry_id")
local state = f[1]
if not state then return {"missing"} end
if f[3] ~= ARGV[2] then return {"stale"} end
if state == "running" then
  if f[2] ~= ARGV[1] then return {"not_owner"} end
  redis.call("INCR", KEYS[4])
  redis.call("INCR", KEYS[5])
  redis.call("HSET", KEYS[1], "state", "queued")
  redis.call("HDEL", KEYS[1], "progress_step", "progress_total")
elseif state ~= "queued" then
  return {"terminal", state}
end
local entry = redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[3], "*", "job_id", ARGV[4])
redis.call("HSET", KEYS[1], "entry_id", entry)
event(KEYS[3], "requeued", "{}")
return {"requeued", entry}
"""
)

# KEYS: stream.  ARGV: group, consumer, entry ids...
# Resets the idle time of entries this consumer still owns (XCLAIM JUSTID does not count a delivery);
# returns the ids it no longer owns (reclaimed by another worker after a stall).
REFRESH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call("XPENDING", KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    table.insert(lost, ARGV[i])
  else
    redis.call("XCLAIM", KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], "JUSTID")
  end
end
return lost
"""
