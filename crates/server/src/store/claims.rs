//! The per-task race between cancel, dispatch and start, decided atomically in
//! Redis (one hash per bucket, Lua scripts), and the bucket leases that say
//! which replica dispatches a bucket.
//!
//! A booked task has no claim until it moves: its bucket's hash holds a
//! mark instead, field `_` = the Redis time (ms) of the hash's first booking,
//! and the task's id is timed by Redis at its booking, never earlier than the
//! marks of its hashes (`Claims::mark`). A missing claim counts as `S` when
//! its id is no older than the mark. After a data loss the hash comes back
//! with a later mark, so the claims lost with it count as missing and SQL
//! decides: a task cancelled before the loss never runs.
//!
//! Claim values: `S` scheduled (a release leaves it so: the start claim
//! decides), `D` dispatched (a dead task run again by RetryTask), `R<n>`
//! attempt n started, `Y<n>` retrying after attempt n, `OK` succeeded, `X`
//! dead, `C` cancelled, `E` expired, `K` skipped (overlap).
//!
//! A success need not be claimed: the server that let an attempt start
//! records its success in SQL only, unless the task holds an overlap marker
//! (below), so its claim stays `R<n>`. A start of a later attempt over `R<n>`
//! therefore asks SQL whether the task ended (`behind`); that start is rare
//! (a redelivery after a lost worker or a lost acknowledgement), the claim
//! per success is not.
//!
//! An occurrence of a schedule with overlap SKIP also has the field
//! `<id>:o` = schedule id in its bucket hash. Its start claim then checks the
//! schedule's overlap marker `kairos:overlap:{<schedule id>}`, which names the
//! last occurrence that started (`<bucket key>|<task id>`): while that one is
//! running or waiting to retry, this one is skipped. The marker key is not
//! passed in KEYS: a clustered Redis would need the schedule's occurrences in
//! one slot, which one Redis (what Kairos uses) does not care about.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};

use crate::domain::TaskId;

/// Errors of the claim store.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Redis could not be reached or failed the command.
    #[error("redis unavailable")]
    Unavailable(#[from] redis::RedisError),
    /// A script answered something this code does not know.
    #[error("unexpected claim answer `{0}`")]
    Unexpected(String),
}

/// Result of a claim operation.
pub type ClaimResult<T> = Result<T, ClaimError>;

/// What the dispatcher may do with a due task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchClaim {
    /// Release it (claimed `dispatched`, possibly again after a crash).
    Go,
    /// Its start deadline passed before release: now EXPIRED, drop it.
    Expired,
    /// It was cancelled: drop it.
    Cancelled,
    /// It already started or ended: drop this copy.
    Done,
    /// Redis has no claim (data loss): check SQL before releasing.
    Missing,
}

/// What Cancel found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelClaim {
    /// Cancelled: it will never run.
    Cancelled,
    /// Too late: the claim value says what it is doing.
    TooLate(String),
}

/// What a worker asking to start an attempt may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartClaim {
    /// Run it. `marker`: it holds its schedule's overlap marker, so its end
    /// must be claimed for the next occurrence to see it ended.
    Run {
        /// Holds an overlap marker.
        marker: bool,
    },
    /// Cancelled before it started: skip.
    Cancelled,
    /// Its start deadline passed: now EXPIRED, skip.
    Expired,
    /// This attempt (or a later one) already started, or the task ended: skip.
    Duplicate(String),
    /// The previous occurrence of its schedule (overlap SKIP) has not finished: now SKIPPED.
    Skipped,
    /// Redis has no claim (data loss): check SQL first.
    Missing,
    /// An earlier attempt started and its end was not claimed: it succeeded
    /// (recorded in SQL only) or its worker was lost. Check SQL first.
    Behind,
}

/// How an attempt ended, as far as the claim is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishClaim {
    /// Succeeded.
    Succeeded,
    /// Will be retried.
    Retrying,
    /// Dead.
    Dead,
}

/// One attempt a worker asks to start.
#[derive(Debug, Clone, Copy)]
pub struct StartRequest<'a> {
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Task id.
    pub id: &'a str,
    /// Attempt number.
    pub attempt: u32,
    /// Start deadline, ms since epoch, 0 when none.
    pub expire_at_ms: i64,
}

/// One attempt's end.
#[derive(Debug, Clone, Copy)]
pub struct FinishRequest<'a> {
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Task id.
    pub id: &'a str,
    /// Attempt number.
    pub attempt: u32,
    /// How it ended.
    pub outcome: FinishClaim,
}

/// Most release claims in one script call, so that a burst's workers' start
/// claims are not queued behind one long script.
const DISPATCH_CHUNK: usize = 256;

/// Lua: whether a task with no claim in hash `key` was booked under its
/// mark (`Claims::mark`): its id's time (the first 48 bits of the UUIDv7,
/// hex) no older than the mark. `marks` caches one read per hash. An id
/// that is no UUID (a worker's report is not trusted) is not covered: it
/// goes to SQL, which does not know it, instead of failing the whole call.
macro_rules! booked_under_mark {
    () => {
        r"
local function booked(key, id, marks)
  local mark = marks[key]
  if mark == nil then
    mark = tonumber(redis.call('HGET', key, '_') or '') or false
    marks[key] = mark
  end
  local born = tonumber(string.sub(id, 1, 8) .. string.sub(id, 10, 13), 16)
  return mark and born ~= nil and born >= mark
end
"
    };
}

const DISPATCH: &str = concat!(
    booked_under_mark!(),
    r"
local out = {}
local marks = {}
local now = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local exp = tonumber(ARGV[i + 1])
  local s = redis.call('HGET', KEYS[1], id)
  if (not s) and (ARGV[1] == '1' or booked(KEYS[1], id, marks)) then s = 'S' end
  if not s then
    out[#out + 1] = 'missing'
  elseif s == 'S' or s == 'D' then
    if exp > 0 and now > exp then
      redis.call('HSET', KEYS[1], id, 'E')
      out[#out + 1] = 'expired'
    else
      if s == 'S' then redis.call('HSET', KEYS[1], id, 'D') end
      out[#out + 1] = 'go'
    end
  elseif s == 'C' then
    out[#out + 1] = 'cancelled'
  else
    out[#out + 1] = 'done'
  end
end
if ARGV[1] == '1' then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return table.concat(out, ' ')
"
);

const CANCEL: &str = r"
local s = redis.call('HGET', KEYS[1], ARGV[1])
if (not s) or s == 'S' or s == 'D' or string.sub(s, 1, 1) == 'Y' then
  redis.call('HSET', KEYS[1], ARGV[1], 'C')
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
  return 'ok'
end
return s
";

// Moves a claim from ARGV[2] to ARGV[3] (a dead task revived, or put back
// when its release failed); a missing claim counts as ARGV[2].
const REVIVE: &str = r"
local s = redis.call('HGET', KEYS[1], ARGV[1])
if (not s) or s == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  return 'ok'
end
return s
";

// Many starts in one call. KEYS are the distinct bucket hashes; ARGV holds
// each one's expiry (set once, after the loop), then `force` and now, then
// four values per item: its key's number in KEYS, id, attempt, start
// deadline. Every argument costs Redis a string object and Lua an interned
// string, so what items share goes once.
const START: &str = concat!(
    booked_under_mark!(),
    r"
local first = #KEYS + 3
local force, now = ARGV[#KEYS + 1] == '1', tonumber(ARGV[#KEYS + 2])
local out = {}
local marks = {}
local used = {}
local k = 0
for b = first, #ARGV, 4 do
  k = k + 1
  local kn = tonumber(ARGV[b])
  local key, id, attempt = KEYS[kn], ARGV[b + 1], ARGV[b + 2]
  local n = tonumber(attempt)
  -- The claim and the overlap field in one call: one call less per start.
  local got = redis.call('HMGET', key, id, id .. ':o')
  local s, schedule = got[1], got[2]
  if not s then
    if force then s = 'D' elseif booked(key, id, marks) then s = 'S' end
  end
  local c = s and string.sub(s, 1, 1)
  local exp = tonumber(ARGV[b + 3])
  if not s then
    out[k] = 'missing'
  elseif s == 'C' then
    out[k] = 'cancelled'
  elseif s == 'OK' or s == 'X' or s == 'E' or s == 'K' then
    out[k] = 'final:' .. s
  elseif (c == 'R' or c == 'Y') and tonumber(string.sub(s, 2)) >= n then
    out[k] = 'duplicate:' .. s
  elseif c == 'R' and not force then
    out[k] = 'behind'
  elseif c ~= 'R' and c ~= 'Y' and exp > 0 and now > exp then
    redis.call('HSET', key, id, 'E')
    out[k] = 'expired'
  else
    local busy = false
    if schedule then
      local marker = 'kairos:overlap:{' .. schedule .. '}'
      local holder = redis.call('GET', marker)
      if holder then
        local sep = string.find(holder, '|', 1, true)
        local hid = string.sub(holder, sep + 1)
        if hid ~= id then
          local hs = redis.call('HGET', string.sub(holder, 1, sep - 1), hid)
          local hc = hs and string.sub(hs, 1, 1)
          busy = hc == 'R' or hc == 'Y'
        end
      end
      if not busy then
        redis.call('SET', marker, key .. '|' .. id, 'PXAT', ARGV[kn])
      end
    end
    if busy then
      redis.call('HSET', key, id, 'K')
      out[k] = 'skipped'
    else
      redis.call('HSET', key, id, 'R' .. attempt)
      out[k] = schedule and 'run:o' or 'run'
    end
    used[kn] = true
  end
end
for kn in pairs(used) do redis.call('PEXPIREAT', KEYS[kn], ARGV[kn]) end
return table.concat(out, ' ')
"
);

// Many results in one call. KEYS are the distinct bucket hashes; ARGV holds
// each one's expiry (set once, after the loop), then four values per item:
// its key's number in KEYS, id, attempt, new claim value. Answers how many
// claims it set: nobody reads more, and a reply of one integer costs the
// client no parsing per item.
const FINISH: &str = r"
local set = 0
local used = {}
for b = #KEYS + 1, #ARGV, 4 do
  local kn = tonumber(ARGV[b])
  local key, id = KEYS[kn], ARGV[b + 1]
  local s = redis.call('HGET', key, id)
  local c = s and string.sub(s, 1, 1)
  local final = s == 'C' or s == 'OK' or s == 'X' or s == 'E' or s == 'K'
  local stale = (c == 'R' or c == 'Y') and tonumber(string.sub(s, 2)) > tonumber(ARGV[b + 2])
  if not (final or stale) then
    redis.call('HSET', key, id, ARGV[b + 3])
    used[kn] = true
    set = set + 1
  end
end
for kn in pairs(used) do redis.call('PEXPIREAT', KEYS[kn], ARGV[kn]) end
return set
";

// Marks the hashes in KEYS (expiries in ARGV) for a booking: sets `_` to
// Redis's time where it is missing, and answers the time the booking's ids
// must carry: now, or a later mark (a clock that went back) if one exists.
const MARK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now
for i, key in ipairs(KEYS) do
  local mark = tonumber(redis.call('HGET', key, '_') or '')
  if not mark then
    redis.call('HSET', key, '_', string.format('%.0f', now))
  elseif mark > at then
    at = mark
  end
  redis.call('PEXPIREAT', key, ARGV[i])
end
return at
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// GCRA, one queue key per request: `KEYS[i]` holds the queue's theoretical
/// arrival time (ms). ARGV: now, then per request the emission interval and
/// the burst tolerance (ms). Answers, per request, 0 (start now) or the ms to
/// wait; requests for one queue in one call are admitted in order.
const RATE: &str = r"
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait > 0 then
    out[i] = math.ceil(wait)
  else
    tat = tat + interval
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now + tolerance) + 1000)
    out[i] = 0
  end
end
return out
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Redis-backed claims and leases. Cheap to clone: one multiplexed connection.
#[derive(Clone)]
pub struct Claims {
    conn: ConnectionManager,
    /// How long a bucket's claims outlive the bucket, so late retries still find them.
    retention: Duration,
    dispatch: Script,
    mark: Script,
    cancel: Script,
    start: Script,
    finish: Script,
    renew: Script,
    release: Script,
    rate: Script,
    revive: Script,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Returns the Redis key of a bucket's claim hash.
pub fn claims_key(bucket_ms: i64) -> String {
    format!("kairos:claims:{{{bucket_ms}}}")
}

/// Fails unless a batch script answered once per item it was given: an
/// answer short or over would pair decisions with the wrong tasks.
fn answered(answers: usize, items: usize, what: &str) -> ClaimResult<()> {
    if answers == items {
        Ok(())
    } else {
        Err(ClaimError::Unexpected(format!(
            "{answers} answers for {items} {what}"
        )))
    }
}

/// Returns the Redis key of a bucket's dispatch lease.
fn lease_key(bucket_ms: i64) -> String {
    format!("kairos:lease:{{{bucket_ms}}}")
}

impl Claims {
    /// Creates the claim store; the connection is made lazily and remade after
    /// an outage, so the server starts and answers UNAVAILABLE while Redis is down.
    pub fn connect(url: &str, retention: Duration) -> ClaimResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_lazy(config)?;
        Ok(Self {
            conn,
            retention,
            dispatch: Script::new(DISPATCH),
            mark: Script::new(MARK),
            cancel: Script::new(CANCEL),
            start: Script::new(START),
            finish: Script::new(FINISH),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            rate: Script::new(RATE),
            revive: Script::new(REVIVE),
        })
    }

    fn expire_at(&self, bucket_ms: i64, width_ms: i64) -> i64 {
        bucket_ms + width_ms + self.retention.as_millis() as i64
    }

    /// Prepares a call of a batch script over the buckets of its items: KEYS
    /// are the distinct claim keys, the first arguments their hash expiries.
    /// Returns it with each item's 1-based key number, in the items' order.
    fn bucketed<'s>(
        &self,
        script: &'s Script,
        width_ms: i64,
        buckets: impl Iterator<Item = i64>,
    ) -> (ScriptInvocation<'s>, Vec<usize>) {
        let mut distinct: Vec<i64> = Vec::new();
        // A batch is mostly one bucket, so the search from the end is short.
        let numbers = buckets
            .map(|bucket| match distinct.iter().rposition(|b| *b == bucket) {
                Some(at) => at + 1,
                None => {
                    distinct.push(bucket);
                    distinct.len()
                }
            })
            .collect();
        let mut invocation = script.prepare_invoke();
        for bucket in distinct {
            invocation
                .key(claims_key(bucket))
                .arg(self.expire_at(bucket, width_ms));
        }
        (invocation, numbers)
    }

    /// Marks the buckets of a booking (one round trip, no write per task)
    /// and returns the time, by Redis's clock, its ids must carry
    /// ([`TaskId::booked`]): their claims then count as scheduled until they
    /// move, while claims lost with a hash stay missing.
    pub async fn mark(&self, buckets: &[i64], width_ms: i64) -> ClaimResult<i64> {
        let mut distinct = buckets.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut invocation = self.mark.prepare_invoke();
        for bucket in distinct {
            invocation
                .key(claims_key(bucket))
                .arg(self.expire_at(bucket, width_ms));
        }
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Records one new occurrence as scheduled; with `overlap_of`, its start
    /// claim will skip it while the schedule's previous occurrence runs.
    pub async fn seed_occurrence(
        &self,
        bucket_ms: i64,
        id: TaskId,
        width_ms: i64,
        overlap_of: Option<TaskId>,
    ) -> ClaimResult<()> {
        let key = claims_key(bucket_ms);
        let mut pipe = redis::pipe();
        pipe.hset_nx(&key, id.to_string(), "S").ignore();
        if let Some(schedule) = overlap_of {
            pipe.hset(&key, format!("{id}:o"), schedule.to_string())
                .ignore();
        }
        pipe.pexpire_at(&key, self.expire_at(bucket_ms, width_ms))
            .ignore();
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Claims due tasks of one bucket for release, given as (id, start
    /// deadline ms or 0); `force` re-creates lost claims (after SQL said the
    /// tasks are still pending). The dispatcher asks it only for tasks past
    /// their deadline, which it marks EXPIRED unless they moved on.
    pub async fn dispatch(
        &self,
        bucket_ms: i64,
        width_ms: i64,
        now_ms: i64,
        tasks: &[(&str, i64)],
        force: bool,
    ) -> ClaimResult<Vec<DispatchClaim>> {
        let mut claims = Vec::with_capacity(tasks.len());
        let mut conn = self.conn.clone();
        // Redis runs one script at a time: a round of thousands in one call
        // held workers' start claims back by ~20 ms at the start of a burst.
        for chunk in tasks.chunks(DISPATCH_CHUNK) {
            let mut invocation = self.dispatch.key(claims_key(bucket_ms));
            invocation
                .arg(if force { "1" } else { "0" })
                .arg(self.expire_at(bucket_ms, width_ms))
                .arg(now_ms);
            for (id, expire_at_ms) in chunk {
                invocation.arg(*id).arg(*expire_at_ms);
            }
            let answers: String = invocation.invoke_async(&mut conn).await?;
            let before = claims.len();
            for answer in answers.split(' ') {
                claims.push(match answer {
                    "go" => DispatchClaim::Go,
                    "expired" => DispatchClaim::Expired,
                    "cancelled" => DispatchClaim::Cancelled,
                    "done" => DispatchClaim::Done,
                    "missing" => DispatchClaim::Missing,
                    _ => return Err(ClaimError::Unexpected(answer.to_owned())),
                });
            }
            answered(claims.len() - before, chunk.len(), "releases")?;
        }
        Ok(claims)
    }

    /// Cancels a task unless a worker has started it.
    pub async fn cancel(
        &self,
        bucket_ms: i64,
        width_ms: i64,
        id: TaskId,
    ) -> ClaimResult<CancelClaim> {
        let mut conn = self.conn.clone();
        let answer: String = self
            .cancel
            .key(claims_key(bucket_ms))
            .arg(id.to_string())
            .arg(self.expire_at(bucket_ms, width_ms))
            .invoke_async(&mut conn)
            .await?;
        Ok(if answer == "ok" {
            CancelClaim::Cancelled
        } else {
            CancelClaim::TooLate(answer)
        })
    }

    /// Moves a dead task's claim back to dispatched (`dead_to_dispatched`)
    /// or the other way; false when the claim is in some other state.
    pub async fn revive(
        &self,
        bucket_ms: i64,
        width_ms: i64,
        id: TaskId,
        dead_to_dispatched: bool,
    ) -> ClaimResult<bool> {
        let (from, to) = if dead_to_dispatched {
            ("X", "D")
        } else {
            ("D", "X")
        };
        let mut conn = self.conn.clone();
        let answer: String = self
            .revive
            .key(claims_key(bucket_ms))
            .arg(id.to_string())
            .arg(from)
            .arg(to)
            .arg(self.expire_at(bucket_ms, width_ms))
            .invoke_async(&mut conn)
            .await?;
        Ok(answer == "ok")
    }

    /// Admits starts under their queues' rate limits (GCRA); one round trip
    /// for all. Each request is (queue, starts per second, burst); answers
    /// are 0 (start now) or the milliseconds to wait, in order.
    pub async fn rate(&self, now_ms: i64, requests: &[(&str, f64, u32)]) -> ClaimResult<Vec<i64>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.rate.prepare_invoke();
        invocation.arg(now_ms);
        for (queue, per_s, burst) in requests {
            let interval = 1000.0 / per_s;
            invocation
                .key(format!("kairos:rate:{{{queue}}}"))
                .arg(interval)
                .arg(interval * f64::from(burst.saturating_sub(1)));
        }
        let mut conn = self.conn.clone();
        let waits: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        answered(waits.len(), requests.len(), "rate requests")?;
        Ok(waits)
    }

    /// Moves each task to running for its attempt, unless it was cancelled,
    /// expired, ended, or that attempt already started; one round trip for all.
    /// `force` (after SQL said the tasks may still run) re-creates lost claims
    /// and lets an attempt start over an earlier one whose end was not claimed.
    pub async fn start(
        &self,
        width_ms: i64,
        now_ms: i64,
        starts: &[StartRequest<'_>],
        force: bool,
    ) -> ClaimResult<Vec<StartClaim>> {
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let (mut invocation, numbers) =
            self.bucketed(&self.start, width_ms, starts.iter().map(|s| s.bucket_ms));
        invocation.arg(if force { "1" } else { "0" }).arg(now_ms);
        for (s, number) in starts.iter().zip(numbers) {
            invocation
                .arg(number)
                .arg(s.id)
                .arg(s.attempt)
                .arg(s.expire_at_ms);
        }
        let mut conn = self.conn.clone();
        let answers: String = invocation.invoke_async(&mut conn).await?;
        let claims: Vec<StartClaim> = answers
            .split(' ')
            .map(|answer| match answer {
                "run" => StartClaim::Run { marker: false },
                "run:o" => StartClaim::Run { marker: true },
                "behind" => StartClaim::Behind,
                "cancelled" => StartClaim::Cancelled,
                "expired" => StartClaim::Expired,
                "missing" => StartClaim::Missing,
                "skipped" => StartClaim::Skipped,
                _ => StartClaim::Duplicate(answer.to_owned()),
            })
            .collect();
        answered(claims.len(), starts.len(), "starts")?;
        Ok(claims)
    }

    /// Records how attempts ended, in one round trip; an older attempt's
    /// report never overwrites a newer one.
    pub async fn finish(&self, width_ms: i64, ends: &[FinishRequest<'_>]) -> ClaimResult<()> {
        if ends.is_empty() {
            return Ok(());
        }
        let (mut invocation, numbers) =
            self.bucketed(&self.finish, width_ms, ends.iter().map(|e| e.bucket_ms));
        for (e, number) in ends.iter().zip(numbers) {
            let value = match e.outcome {
                FinishClaim::Succeeded => "OK".to_owned(),
                FinishClaim::Dead => "X".to_owned(),
                FinishClaim::Retrying => format!("Y{}", e.attempt),
            };
            invocation.arg(number).arg(e.id).arg(e.attempt).arg(value);
        }
        let mut conn = self.conn.clone();
        let _set: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Takes or renews the dispatch lease of a bucket; true when `owner` holds it.
    pub async fn lease(&self, bucket_ms: i64, owner: &str, ttl: Duration) -> ClaimResult<bool> {
        let mut conn = self.conn.clone();
        let ttl_ms = ttl.as_millis() as u64;
        let taken: Option<String> = redis::cmd("SET")
            .arg(lease_key(bucket_ms))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await?;
        if taken.is_some() {
            return Ok(true);
        }
        let renewed: i64 = self
            .renew
            .key(lease_key(bucket_ms))
            .arg(owner)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives a bucket's lease back, if `owner` still holds it.
    pub async fn release_lease(&self, bucket_ms: i64, owner: &str) -> ClaimResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(lease_key(bucket_ms))
            .arg(owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}
