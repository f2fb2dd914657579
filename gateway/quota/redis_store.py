"""The Redis quota store: shared by any number of gateway replicas.

Each admit, settle, release and renew is one Lua script, so it is atomic
against every other replica; scripts run by EVALSHA on the store's own
connections, and are sent whole (EVAL) on a NOSCRIPT reply
(`gateway.quota.redis_wire`). An admit is one round trip: what it sends for
a tenant's scopes is encoded once per calendar period (`_AdmitPlan`), and
its script reads a scope's counters with one MGET and sets each new total
with its expiry in one SET (each command a script runs costs about as much
as what it does). Time inside the scripts is the Redis server's `TIME`,
never a gateway's clock, so replicas agree on the sliding windows and lease
expiries. Calendar periods need the tenant's time zone, which Lua cannot
do: the gateway sends the day (and month) before, around and after its own
clock, and the script charges the one that contains Redis time.

Keys, all under the tenant's hash tag (see `gateway.quota.limits`):

    tollgate:q:{T}:leases              HASH  lease id -> JSON record of what it charged
    tollgate:q:{T}:lease_exp           ZSET  lease id -> expiry (ms)
    <scope>:win                        ZSET  "<lease>|<tokens>" -> admitted at (ms)
    <scope>:win:sum                    STR   tokens in <scope>:win
    <scope>:conc                       STR   leases in flight
    <scope>:day:<YYYY-MM-DD>           STR   tokens charged that local day
    <scope>:month:<YYYY-MM>            STR   tokens charged that local month

where <scope> is `tollgate:q:{T}:t`, `...:t|m|<model>`, `...:a|<app>` or
`...:a|<app>|m|<model>`. Settling and reclaiming touch the keys a lease record
names: undeclared keys, but in the same slot as the declared ones, which
Redis Cluster serves.

Usage records (`gateway.usage`) go to one stream per tenant, in the tenant's
slot, so the scripts that settle, release and reclaim append them atomically:

    tollgate:u:{T}                     STREAM  d=<UTC day> r=<record JSON> [c=1]
    tollgate:u:tenants                 SET     tenants that may have records

A lease record also keeps the request's open record (`u`, its day `ud` and
start `t0`); reclaiming the lease closes and appends it (status
`interrupted`). `c=1` flags a record whose request id may appear twice.
The tenant set is a key of its own slot, written by the gateway (outside
any script) before a tenant's first record, for the drainer to find streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.quota.limits import COUNTED, WINDOW_S, Reservation, Scope, tenant_prefix
from gateway.quota.periods import Period, PeriodCache
from gateway.quota.redis_wire import Arg, Lane, ScriptCall, encode
from gateway.quota.store import Admission, Figure, Lease, ScopeUsage, charged
from gateway.usage.record import UsageEntry

RECLAIM_BATCH = 64
"""Expired leases refunded per admit at most, so one admit stays cheap even
after a gateway with many requests in flight was killed."""

_KEYS_PER_SCOPE = 9
_ARGS_PER_SCOPE = 7

USAGE_PREFIX = "tollgate:u:"
TENANTS_KEY = USAGE_PREFIX + "tenants"
REGISTER_EVERY_S = 60.0
"""How often one process re-adds a tenant to `TENANTS_KEY` (in case Redis
lost it); a tenant's first record always registers it first."""


async def registered_tenants(client: Redis) -> list[str]:
    """The tenants in `TENANTS_KEY`, sorted."""
    members: set[bytes | str] = await client.smembers(TENANTS_KEY)  # type: ignore[misc]
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)


def usage_stream(tenant_id: str) -> str:
    """`tollgate:u:{tenant}`: the tenant's usage stream (its quota keys' slot)."""
    return f"{USAGE_PREFIX}{{{tenant_id}}}"


_PRELUDE = r"""
local function now_ms(override)
  if override ~= nil and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function member_tokens(m)
  return tonumber(string.match(m, '|(%-?%d+)$'))
end

-- Drop entries admitted at or before `cutoff`: how many, and their tokens.
-- The caller corrects the window's sum (with the write it does anyway).
local function drop_old(win, cutoff)
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', cutoff)
  if #old == 0 then return 0, 0 end
  local freed = 0
  for _, m in ipairs(old) do freed = freed + member_tokens(m) end
  redis.call('ZREMRANGEBYSCORE', win, '-inf', cutoff)
  return #old, freed
end

-- Settle a lease record with `actual` tokens, or refund all of it (nil).
local function undo(lease, rec, actual)
  local cost = rec.c
  local delta = -cost
  if actual ~= nil then delta = actual - cost end
  local member = lease .. '|' .. cost
  for _, w in ipairs(rec.w) do
    local score = redis.call('ZSCORE', w[1], member)
    if score then
      redis.call('ZREM', w[1], member)
      if actual ~= nil then redis.call('ZADD', w[1], score, lease .. '|' .. actual) end
      if redis.call('ZCARD', w[1]) == 0 then
        redis.call('DEL', w[2])
      elseif delta ~= 0 then
        redis.call('INCRBY', w[2], delta)
      end
    end
  end
  for _, key in ipairs(rec.b) do
    -- A missing key means its period's data is gone: nothing to correct.
    if delta ~= 0 and redis.call('EXISTS', key) == 1 then
      if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  end
  for _, key in ipairs(rec.s) do
    if redis.call('DECR', key) <= 0 then redis.call('DEL', key) end
  end
end

-- Refund expired leases; append the open usage record of each (interrupted).
local function reclaim(leases, expiries, now, batch, stream)
  local ids = redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, batch)
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', leases, id)
    if raw then
      local rec = cjson.decode(raw)
      undo(id, rec, nil)
      if rec.u then
        local closed = string.sub(rec.u, 1, -2) .. ',"ended_ms":' .. string.format('%d', now)
          .. ',"latency_ms":' .. string.format('%d', now - tonumber(rec.t0)) .. '}'
        redis.call('XADD', stream, '*', 'd', rec.ud, 'r', closed, 'c', '1')
      end
    end
    redis.call('HDEL', leases, id)
    redis.call('ZREM', expiries, id)
  end
  return #ids
end

-- The candidate period (of three) that contains `now`: key and end (ms).
-- KEYS[k..k+2] are the periods, ARGV[a..a+3] their edges (ms): numbers
-- rather than one list, as parsing a list cost more than the rest of a check.
local function pick(k, a, now)
  local lo = tonumber(ARGV[a])
  for j = 1, 3 do
    local hi = tonumber(ARGV[a + j])
    if now >= lo and now < hi then return KEYS[k + j - 1], hi end
    lo = hi
  end
  return nil, nil
end
"""

_ADMIT = (
    _PRELUDE
    + r"""
-- KEYS: leases, lease expiries, usage stream, then 9 per scope: window,
-- window sum, concurrency, 3 candidate days, 3 candidate months.
-- ARGV: lease, cost, now override, open record ('' = none), its day, its
-- start; then lease TTL, window (ms), scope count, reclaim batch; then 13
-- per scope: rpm, tpm, concurrency, day and month budgets, the 4 edges of the
-- candidate days and the 4 of the candidate months.
-- (What changes per request comes first: the rest is encoded once.)
local leases, expiries, stream = KEYS[1], KEYS[2], KEYS[3]
local lease, cost = ARGV[1], tonumber(ARGV[2])
local now = now_ms(ARGV[3])
local ttl, win_ms, n = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
reclaim(leases, expiries, now, tonumber(ARGV[10]), stream)
if redis.call('HEXISTS', leases, lease) == 1 then return '2' end

-- The periods first: a clock outside them fails before anything is written.
local budgets = {}
for i = 0, n - 1 do
  local k, a = 3 + i * 9, 10 + i * 13
  local found = {}
  local specs = {{3, tonumber(ARGV[a + 4]), k + 4, a + 6},
                 {4, tonumber(ARGV[a + 5]), k + 7, a + 10}}
  for _, spec in ipairs(specs) do
    if spec[2] > 0 then
      local key, stop = pick(spec[3], spec[4], now)
      if key == nil then return redis.error_reply('TOLLGATE clock outside the sent periods') end
      found[#found + 1] = {spec[1], spec[2], key, stop}
    end
  end
  budgets[i] = found
end

local out = {1}
local refused = false
local plans = {}
-- Appends one figure; returns the index of its reset.
local function figure(kind, i, limit, used, reset, retry, never)
  local j = #out
  out[j + 1], out[j + 2], out[j + 3], out[j + 4] = kind, i, limit, used
  out[j + 5], out[j + 6], out[j + 7] = reset, retry, never
  return j + 5
end

for i = 0, n - 1 do
  local k, a = 3 + i * 9, 10 + i * 13
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local plan = {b = {}, resets = {}, count = 0, dropped = 0, total = 0}
  -- Every counter of the scope in one MGET: each command a script runs
  -- costs about as much as the work it does here.
  local reads = {}
  local freed = 0
  if rpm > 0 or tpm > 0 then
    plan.w = {KEYS[k + 1], KEYS[k + 2]}
    plan.dropped, freed = drop_old(KEYS[k + 1], now - win_ms)
    plan.count = redis.call('ZCARD', KEYS[k + 1])
    reads[#reads + 1] = KEYS[k + 2]
  end
  if conc > 0 then
    plan.s = KEYS[k + 3]
    reads[#reads + 1] = KEYS[k + 3]
  end
  for _, b in ipairs(budgets[i]) do reads[#reads + 1] = b[3] end
  local got = {}
  if #reads > 0 then got = redis.call('MGET', unpack(reads)) end
  local r = 1
  if plan.w then
    local count = plan.count
    -- An emptied window has no sum (its key is deleted below).
    if plan.dropped == 0 or count > 0 then plan.total = tonumber(got[r] or '0') - freed end
    r = r + 1
    if rpm > 0 then
      local retry = -1
      if count + 1 > rpm then
        refused = true
        local oldest = redis.call('ZRANGE', plan.w[1], count - rpm, count - rpm, 'WITHSCORES')
        retry = tonumber(oldest[2]) + win_ms - now
      end
      plan.resets[#plan.resets + 1] = figure(0, i, rpm, count, 0, retry, 0)
    end
    if tpm > 0 then
      local total = plan.total
      local retry, never = -1, 0
      if total + cost > tpm then
        refused = true
        if cost > tpm then
          never, retry = 1, win_ms
        else
          local excess = total + cost - tpm
          local entries = redis.call('ZRANGE', plan.w[1], 0, -1, 'WITHSCORES')
          for j = 1, #entries, 2 do
            excess = excess - member_tokens(entries[j])
            if excess <= 0 then
              retry = tonumber(entries[j + 1]) + win_ms - now
              break
            end
          end
        end
      end
      plan.resets[#plan.resets + 1] = figure(1, i, tpm, total, 0, retry, never)
    end
  end
  if plan.s then
    local used = tonumber(got[r] or '0')
    r = r + 1
    local retry = -1
    if used + 1 > conc then
      refused = true
      retry = 1000
    end
    figure(2, i, conc, used, 0, retry, 0)
  end
  for _, b in ipairs(budgets[i]) do
    local limit, key, stop = b[2], b[3], b[4]
    local used = tonumber(got[r] or '0')
    r = r + 1
    local retry, never = -1, 0
    if used + cost > limit then
      refused = true
      retry = stop - now
      if cost > limit then never = 1 end
    end
    figure(b[1], i, limit, used, stop - now, retry, never)
    plan.b[#plan.b + 1] = {key, stop, used}
  end
  plans[#plans + 1] = plan
end

if refused then
  for _, plan in ipairs(plans) do
    if plan.w then
      -- Windows reset a minute after their newest entry (only a refusal
      -- reports it: an admitted request's window resets a minute from now).
      if plan.count > 0 and #plan.resets > 0 then
        local newest = redis.call('ZRANGE', plan.w[1], -1, -1, 'WITHSCORES')
        for _, j in ipairs(plan.resets) do out[j] = tonumber(newest[2]) + win_ms - now end
      end
      -- Keep the sum exact after dropping old entries.
      if plan.dropped > 0 then
        if plan.count == 0 then
          redis.call('DEL', plan.w[2])
        else
          redis.call('SET', plan.w[2], string.format('%d', plan.total), 'KEEPTTL')
        end
      end
    end
  end
  out[1] = 0
  return table.concat(out, ',')
end

local rec = {c = cost, w = {}, s = {}, b = {}}
local member = lease .. '|' .. cost
for _, plan in ipairs(plans) do
  if plan.w then
    redis.call('ZADD', plan.w[1], now, member)
    redis.call('PEXPIRE', plan.w[1], win_ms + 1000)
    -- The new sum and its expiry in one command (read above, in this script).
    redis.call('SET', plan.w[2], string.format('%d', plan.total + cost), 'PX', win_ms + 1000)
    rec.w[#rec.w + 1] = plan.w
  end
  if plan.s then
    redis.call('INCR', plan.s)
    rec.s[#rec.s + 1] = plan.s
  end
  for _, b in ipairs(plan.b) do
    -- The new total with a relative expiry a day past the period's end
    -- (garbage collection only), in one command.
    redis.call('SET', b[1], string.format('%d', b[3] + cost), 'PX', b[2] - now + 86400000)
    rec.b[#rec.b + 1] = b[1]
  end
end
if ARGV[4] ~= '' then
  rec.u, rec.ud, rec.t0 = ARGV[4], ARGV[5], ARGV[6]
end
redis.call('HSET', leases, lease, cjson.encode(rec))
redis.call('ZADD', expiries, now + ttl, lease)
-- One bulk string: far cheaper for the client to read than an array.
return table.concat(out, ',')
"""
)

_FINISH = (
    _PRELUDE
    + r"""
-- ARGV: lease, actual ('' = refund), record day, record ('' = none),
-- only-if-known ('1'), flag for de-duplication ('1').
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  if ARGV[4] ~= '' and ARGV[5] ~= '1' then
    redis.call('XADD', KEYS[3], '*', 'd', ARGV[3], 'r', ARGV[4], 'c', '1')
  end
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local actual = nil
if ARGV[2] ~= '' then actual = tonumber(ARGV[2]) end
undo(ARGV[1], cjson.decode(raw), actual)
if ARGV[4] ~= '' then
  if ARGV[6] == '1' then
    redis.call('XADD', KEYS[3], '*', 'd', ARGV[3], 'r', ARGV[4], 'c', '1')
  else
    redis.call('XADD', KEYS[3], '*', 'd', ARGV[3], 'r', ARGV[4])
  end
end
return 1
"""
)

_SWEEP = (
    _PRELUDE
    + r"""
return reclaim(KEYS[1], KEYS[2], now_ms(ARGV[1]), tonumber(ARGV[2]), KEYS[3])
"""
)

_RENEW = (
    _PRELUDE
    + r"""
local now = now_ms(ARGV[2])
local expires = now + tonumber(ARGV[1])
local renewed = 0
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], expires, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""
)

_PEEK = (
    _PRELUDE
    + r"""
local now = now_ms(ARGV[1])
local win_ms = tonumber(ARGV[2])
local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - win_ms), '+inf')
local tokens = 0
for _, m in ipairs(entries) do tokens = tokens + member_tokens(m) end
local conc = tonumber(redis.call('GET', KEYS[2]) or '0')
local day_key = pick(3, 3, now)
local month_key = pick(6, 7, now)
local day = tonumber(redis.call('GET', day_key) or '0')
local month = tonumber(redis.call('GET', month_key) or '0')
return {#entries, tokens, conc, day, month}
"""
)


def _bounds_ms(periods: tuple[Period, Period, Period]) -> list[Arg]:
    """The four edges (ms) of three consecutive periods, for `pick`."""
    edges = [periods[0].start_s, periods[0].end_s, periods[1].end_s, periods[2].end_s]
    return [round(edge * 1000) for edge in edges]


def _period_keys(scope: Scope, unit: str, periods: tuple[Period, Period, Period]) -> list[Arg]:
    return [f"{scope.key}:{unit}:{p.label}" for p in periods]


MAX_CONNECTIONS = 256
"""Redis connections per gateway process for the scripts (and as many for
other commands). A burst waits for a free one (within the timeout) instead
of failing: a pool that refuses connections would trip the breaker and turn
a burst into 503s."""

PLAN_CACHE_SIZE = 4096
"""Encoded admit plans kept per process (one per tenant and set of scopes);
past this the cache starts over, which costs a few microseconds per plan."""


def connect(url: str, *, timeout_s: float) -> Redis:
    """A client with short socket timeouts and no retries: the breaker, not
    the client, decides what to do when Redis is slow or gone (and a retried
    admit must never be charged twice). The store runs its scripts on
    connections of its own with the same settings (`redis_wire.Lane`)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return Redis(connection_pool=pool)


@dataclass(frozen=True, slots=True)
class _AdmitPlan:
    """What an admit sends that is the same for every request of one tenant
    and set of scopes until a day or month of theirs ends: the keys and the
    limits, encoded once. Only lease, cost, clock and record vary."""

    since_s: float
    until_s: float
    """The plan holds for local clocks in [since_s, until_s)."""
    keys: bytes
    """`numkeys` and the keys."""
    limits: bytes
    """The arguments after the per-request ones."""
    parts: int
    """Bulk strings in `keys` and `limits` together."""


_PER_REQUEST_ARGS = 6


class RedisQuotaStore:
    """`QuotaStore` on Redis (one server, Sentinel, or Cluster by hash tag)."""

    def __init__(
        self,
        client: Redis,
        *,
        lease_ttl_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` is for tests only: when given, the scripts use it instead of
        Redis `TIME`, so windows and calendars can be tested without waiting.
        Scripts run on connections like `client`'s, kept by the store."""
        self._client = client
        pool = client.connection_pool
        self._lane = Lane(pool, max_connections=min(pool.max_connections, MAX_CONNECTIONS))
        self._ttl_ms = round(lease_ttl_s * 1000)
        self._clock = clock
        self._admit = ScriptCall(_ADMIT)
        self._finish = ScriptCall(_FINISH)
        self._renew = ScriptCall(_RENEW)
        self._peek = ScriptCall(_PEEK)
        self._sweep = ScriptCall(_SWEEP)
        self._periods = PeriodCache()
        self._plans: dict[tuple[str, tuple[Scope, ...]], _AdmitPlan] = {}
        self._registered: dict[str, float] = {}

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.time()

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(round(self._clock() * 1000))

    def _plan(self, reservation: Reservation, local_now: float) -> _AdmitPlan:
        """The cached plan for the reservation's tenant and scopes, or a new one."""
        cache_key = (reservation.tenant_id, reservation.scopes)
        plan = self._plans.get(cache_key)
        if plan is not None and plan.since_s <= local_now < plan.until_s:
            return plan
        prefix = tenant_prefix(reservation.tenant_id)
        keys: list[Arg] = [
            prefix + "leases",
            prefix + "lease_exp",
            usage_stream(reservation.tenant_id),
        ]
        limits: list[Arg] = [
            self._ttl_ms,
            round(WINDOW_S * 1000),
            len(reservation.scopes),
            RECLAIM_BATCH,
        ]
        since, until = -math.inf, math.inf
        for scope in reservation.scopes:
            days = self._periods.around("day", local_now, scope.time_zone)
            months = self._periods.around("month", local_now, scope.time_zone)
            since = max(since, days[1].start_s, months[1].start_s)
            until = min(until, days[1].end_s, months[1].end_s)
            keys += [scope.key + ":win", scope.key + ":win:sum", scope.key + ":conc"]
            keys += _period_keys(scope, "day", days) + _period_keys(scope, "month", months)
            limits += [
                scope.requests_per_minute or 0,
                scope.tokens_per_minute or 0,
                scope.max_concurrent or 0,
                scope.tokens_per_day or 0,
                scope.tokens_per_month or 0,
                *_bounds_ms(days),
                *_bounds_ms(months),
            ]
        plan = _AdmitPlan(
            since,
            until,
            encode(len(keys), *keys),
            encode(*limits),
            1 + len(keys) + len(limits),
        )
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan

    async def admit(self, reservation: Reservation) -> Admission:
        """See `QuotaStore.admit`: one script, one round trip (two, once a
        minute per tenant, to register the tenant's usage stream first)."""
        plan = self._plan(reservation, self._now())
        usage = reservation.usage
        if usage is not None:
            await self._register(reservation.tenant_id)
            varying = encode(
                reservation.lease_id,
                reservation.tokens,
                self._now_arg(),
                usage.data,
                usage.day,
                usage.started_ms,
            )
        else:
            varying = encode(reservation.lease_id, reservation.tokens, self._now_arg(), "", "", 0)
        reply: bytes = await self._lane.script(
            self._admit,
            b"".join((plan.keys, varying, plan.limits)),
            plan.parts + _PER_REQUEST_ARGS,
        )
        raw = [int(v) for v in reply.split(b",")]
        lease = Lease(reservation.tenant_id, reservation.lease_id, reservation.tokens)
        status = raw[0]
        if status == 2:  # this lease was already admitted (a repeated call)
            return Admission(lease)
        figures = [_figure(raw[i : i + 7], reservation.scopes) for i in range(1, len(raw), 7)]
        if status == 1:
            return Admission(lease, tuple(charged(f, reservation.tokens) for f in figures))
        return Admission(None, tuple(figures))

    async def settle(
        self, lease: Lease, actual_tokens: int, usage: UsageEntry | None = None
    ) -> bool:
        """See `QuotaStore.settle`."""
        return await self._run_finish(lease, str(max(0, actual_tokens)), usage)

    async def release(self, lease: Lease, usage: UsageEntry | None = None) -> bool:
        """See `QuotaStore.release`."""
        return await self._run_finish(lease, "", usage)

    async def _run_finish(self, lease: Lease, actual: str, usage: UsageEntry | None) -> bool:
        prefix = tenant_prefix(lease.tenant_id)
        args: list[Arg] = [lease.lease_id, actual]
        if usage is None:
            args += ["", "", "0", "0"]
        else:
            await self._register(lease.tenant_id)
            only = "1" if usage.only_if_known else "0"
            args += [usage.day, usage.data, only, "1" if usage.check else "0"]
        done = await self._lane.call(
            self._finish,
            [prefix + "leases", prefix + "lease_exp", usage_stream(lease.tenant_id)],
            args,
        )
        return bool(done)

    async def append(self, tenant_id: str, usage: UsageEntry) -> None:
        """See `QuotaStore.append`."""
        await self._register(tenant_id)
        stream = usage_stream(tenant_id)
        if usage.check:
            await self._client.xadd(stream, {"d": usage.day, "r": usage.data, "c": "1"})
        else:
            await self._client.xadd(stream, {"d": usage.day, "r": usage.data})

    async def _register(self, tenant_id: str) -> None:
        """Make sure the drainer knows the tenant's stream (before its first record)."""
        now = time.monotonic()
        if self._registered.get(tenant_id, 0.0) > now:
            return
        await self._client.sadd(TENANTS_KEY, tenant_id)
        self._registered[tenant_id] = now + REGISTER_EVERY_S

    async def sweep(self) -> int:
        """See `QuotaStore.sweep` (one script per tenant with records)."""
        reclaimed = 0
        for tenant_id in await registered_tenants(self._client):
            prefix = tenant_prefix(tenant_id)
            keys: list[Arg] = [prefix + "leases", prefix + "lease_exp", usage_stream(tenant_id)]
            while True:
                done = int(
                    await self._lane.call(self._sweep, keys, [self._now_arg(), RECLAIM_BATCH])
                )
                reclaimed += done
                if done < RECLAIM_BATCH:
                    break
        return reclaimed

    async def renew(self, leases: Sequence[Lease]) -> int:
        """See `QuotaStore.renew` (one script per tenant)."""
        by_tenant: dict[str, list[Arg]] = {}
        for lease in leases:
            by_tenant.setdefault(lease.tenant_id, []).append(lease.lease_id)
        renewed = 0
        for tenant_id, ids in by_tenant.items():
            prefix = tenant_prefix(tenant_id)
            renewed += int(
                await self._lane.call(
                    self._renew,
                    [prefix + "leases", prefix + "lease_exp"],
                    [self._ttl_ms, self._now_arg(), *ids],
                )
            )
        return renewed

    async def peek(self, scope: Scope) -> ScopeUsage:
        """See `QuotaStore.peek`."""
        local_now = self._now()
        days = self._periods.around("day", local_now, scope.time_zone)
        months = self._periods.around("month", local_now, scope.time_zone)
        keys: list[Arg] = [scope.key + ":win", scope.key + ":conc"]
        keys += _period_keys(scope, "day", days) + _period_keys(scope, "month", months)
        raw: list[int] = await self._lane.call(
            self._peek,
            keys,
            [self._now_arg(), round(WINDOW_S * 1000), *_bounds_ms(days), *_bounds_ms(months)],
        )
        requests, tokens, concurrent, day, month = (int(v) for v in raw)
        return ScopeUsage(requests, tokens, concurrent, day, month)

    async def ping(self) -> None:
        """See `QuotaStore.ping`: one PING round trip."""
        await self._client.ping()  # type: ignore[misc]

    async def reset_connections(self) -> None:
        """Drop the idle connections (after a connection error)."""
        await self._lane.reset()
        await self._client.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        """Close the store's connections and the client's pool."""
        await self._lane.reset()
        await self._client.aclose()


def _figure(raw: Sequence[int], scopes: Sequence[Scope]) -> Figure:
    """One figure from the script's flat reply (times in ms, -1 for none)."""
    kind_index, scope_index, limit, used, reset_ms, retry_ms, never = raw
    return Figure(
        COUNTED[kind_index],
        scopes[scope_index].label,
        limit,
        used,
        max(0, reset_ms) / 1000,
        None if retry_ms < 0 else max(0, retry_ms) / 1000,
        never == 1,
    )
