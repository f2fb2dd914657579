"""Where usage records wait before the ledger, and how the drainer takes them.

A `UsageSource` hands out records in order, is told when a batch is about
to be written (`mark`) and when it is durable (`ack`), and only then
forgets it. A record handed out again after a `mark` without an `ack` (the
drainer died, or its write failed) comes back flagged `dedup_check`, so
exports can drop the copy that may already be on disk.

- `MemoryUsageSource`: the memory store's buffer, in this process.
- `RedisUsageSource`: the per-tenant streams `tollgate:u:{T}` that the Redis
  store's scripts append to. One drainer at a time holds the lock
  `tollgate:u:{drainer}:lock` (a token with a TTL, renewed each round); the
  hash `tollgate:u:{drainer}:read` keeps, per tenant, the newest entry id
  ever marked for writing. Marking is fenced by the lock, so a drainer that
  lost it (paused past its TTL) cannot write unflagged copies of records the
  next one already took. Acknowledging deletes the entries (XDEL).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.quota.memory import MemoryQuotaStore
from gateway.usage.ledger import Line

if TYPE_CHECKING:
    # Imported where used at run time: a gateway on the memory store never
    # loads the redis client (about 9 MB of RSS with its dependencies).
    from redis.asyncio import Redis

    from gateway.quota.redis_store import RedisQuotaStore

READ_CHUNK = 5000
"""Entries one read script returns at most: Redis runs a script alone, so
a bounded one keeps the quota scripts' latency low while the drainer reads."""


class LostLeadershipError(Exception):
    """Another drainer holds the lock now: drop the batch, write nothing."""


@dataclass
class Batch:
    """Records handed out together."""

    lines: list[Line]
    count: int = 0
    """Memory: how many buffer entries the batch covers."""
    ids: dict[str, list[bytes]] = field(default_factory=dict)
    """Redis: stream entry ids per tenant."""


class UsageSource(Protocol):
    """What the drainer needs from where records wait."""

    async def acquire(self) -> bool:
        """Become (or stay) the one active drainer; False when another is."""
        ...

    async def sweep(self) -> int:
        """Reclaim expired leases, appending their interrupted records."""
        ...

    async def read(self, limit: int) -> Batch:
        """Up to `limit` records not yet acknowledged, oldest first."""
        ...

    async def mark(self, batch: Batch) -> None:
        """`batch` is about to be written (raises LostLeadershipError)."""
        ...

    async def ack(self, batch: Batch) -> None:
        """`batch` is durable in the ledger: forget it."""
        ...

    async def release(self) -> None:
        """Give up the active role (shutdown)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryUsageSource:
    """The memory store's buffer (one process: always the active drainer)."""

    def __init__(self, store: MemoryQuotaStore) -> None:
        self._store = store
        self._seen = 0
        """Entries at the buffer's front that were handed out for writing."""

    async def acquire(self) -> bool:
        """Always: this process is the only one."""
        return True

    async def sweep(self) -> int:
        """See `UsageSource.sweep`."""
        return await self._store.sweep()

    async def read(self, limit: int) -> Batch:
        """See `UsageSource.read`."""
        entries = list(itertools.islice(self._store.usage_buffer, limit))
        lines = [Line(e.day, e.data, e.check or i < self._seen) for i, e in enumerate(entries)]
        return Batch(lines, count=len(entries))

    async def mark(self, batch: Batch) -> None:
        """See `UsageSource.mark`."""
        self._seen = max(self._seen, batch.count)

    async def ack(self, batch: Batch) -> None:
        """See `UsageSource.ack`."""
        buffer = self._store.usage_buffer
        for _ in range(batch.count):
            buffer.popleft()
        self._seen = max(0, self._seen - batch.count)

    async def release(self) -> None:
        """Nothing to give up."""

    async def close(self) -> None:
        """Nothing to close."""


_ACQUIRE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_MARK = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
for i = 2, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  local newer = true
  if old then
    local old_ms, old_seq = parse(old)
    local new_ms, new_seq = parse(ARGV[i + 1])
    newer = new_ms > old_ms or (new_ms == old_ms and new_seq > old_seq)
  end
  if newer then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

_READ = r"""
-- Up to ARGV[1] entries of one stream as two strings (cheap to parse in
-- Python, where a reply of many small items is not): the ids, space-separated,
-- and the records as lines "<day>\t<flag>\t<json>" (JSON has no raw tab or newline).
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', ARGV[1])
local ids, lines = {}, {}
for i, entry in ipairs(entries) do
  ids[i] = entry[1]
  local fields, day, record, flag = entry[2], '', '{}', '0'
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'd' then day = fields[j + 1]
    elseif name == 'r' then record = fields[j + 1]
    elseif name == 'c' then flag = fields[j + 1] end
  end
  lines[i] = day .. '\t' .. flag .. '\t' .. record
end
return {table.concat(ids, ' '), table.concat(lines, '\n')}
"""

_RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class RedisUsageSource:
    """The per-tenant usage streams in Redis."""

    def __init__(self, client: Redis, store: RedisQuotaStore, *, lock_ttl_s: float) -> None:
        from gateway.quota.redis_store import USAGE_PREFIX

        self._lock_key = USAGE_PREFIX + "{drainer}:lock"
        self._read_key = USAGE_PREFIX + "{drainer}:read"
        self._client = client
        self._store = store
        self._token = uuid.uuid4().hex
        self._lock_ttl_ms = round(lock_ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._mark = client.register_script(_MARK)
        self._read = client.register_script(_READ)
        self._release = client.register_script(_RELEASE)
        self._turn = 0

    async def acquire(self) -> bool:
        """See `UsageSource.acquire`."""
        got = await self._acquire(keys=[self._lock_key], args=[self._token, self._lock_ttl_ms])
        return bool(got)

    async def sweep(self) -> int:
        """See `UsageSource.sweep`."""
        return await self._store.sweep()

    async def _tenants(self) -> list[str]:
        from gateway.quota.redis_store import registered_tenants

        tenants = await registered_tenants(self._client)
        if tenants:
            # Start at a different tenant each time: a busy one cannot starve the rest.
            self._turn = (self._turn + 1) % len(tenants)
            tenants = tenants[self._turn :] + tenants[: self._turn]
        return tenants

    async def read(self, limit: int) -> Batch:
        """See `UsageSource.read`."""
        from gateway.quota.redis_store import usage_stream

        batch = Batch([])
        tenants = await self._tenants()
        marks: list[bytes | str | None] = []
        if tenants:
            marks = await self._client.hmget(self._read_key, tenants)  # type: ignore[misc]
        for tenant, mark in zip(tenants, marks, strict=True):
            if isinstance(mark, str):
                mark = mark.encode()
            seen = _id_key(mark) if mark else (-1, -1)
            stream = usage_stream(tenant)
            after = b"-"
            while len(batch.lines) < limit:
                count = min(READ_CHUNK, limit - len(batch.lines))
                raw_ids, raw_lines = await self._read(keys=[stream], args=[count, after])
                if not raw_ids:
                    break
                ids = raw_ids.split(b" ")
                for entry_id, text in zip(ids, raw_lines.split(b"\n"), strict=True):
                    day, flag, data = text.split(b"\t", 2)
                    check = flag == b"1" or _id_key(entry_id) <= seen
                    batch.lines.append(Line(day.decode(), data, check))
                batch.ids.setdefault(tenant, []).extend(ids)
                if len(ids) < count:
                    break
                ms, seq = _id_key(ids[-1])
                after = b"%d-%d" % (ms, seq + 1)  # the next possible id
            if len(batch.lines) >= limit:
                break
        return batch

    async def mark(self, batch: Batch) -> None:
        """See `UsageSource.mark`."""
        args: list[str | bytes | int] = [self._token]
        for tenant, ids in batch.ids.items():
            if ids:
                args += [tenant, ids[-1]]
        if not await self._mark(keys=[self._lock_key, self._read_key], args=args):
            raise LostLeadershipError("another drainer holds the usage lock")

    async def ack(self, batch: Batch) -> None:
        """See `UsageSource.ack`."""
        from gateway.quota.redis_store import usage_stream

        async with self._client.pipeline(transaction=False) as pipe:
            for tenant, ids in batch.ids.items():
                for chunk in _chunks(ids, 1000):
                    pipe.xdel(usage_stream(tenant), *chunk)
            await pipe.execute()

    async def release(self) -> None:
        """See `UsageSource.release`."""
        await self._release(keys=[self._lock_key], args=[self._token])

    async def close(self) -> None:
        """Close the drainer's own connection pool."""
        await self._client.aclose()


def _chunks(items: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
