"""The Redis store's scripts on the wire: pre-encoded commands on connections
kept by the store, so that an admit costs one round trip and little CPU.

Why not redis-py's `Script` and pool for the scripts (measured on the
benchmark's 2-core machine, uvloop, one scope with every limit):

- redis-py spent about 90 us of CPU per admit: 30 us building keys and
  arguments, 17 us encoding them, 19 us taking and returning a pooled
  connection (a condition, a lock, a timer and metrics hooks), the rest in
  `execute_command`. Here what does not change between requests is encoded
  once (`ScriptCall` and the store's admit plans) and an idle connection is
  popped from a list (`Lane`): about 45 us for the whole admit, reply
  included (settle: 62 to 24 us).
- With a socket timeout, redis-py writes every command inside
  `asyncio.wait_for`, which on Python 3.11 starts a task per write: every
  call waits two extra turns of the event loop. At concurrency 16 that was
  3.5 ms per admit, most of what the Redis store added. A `Lane` connection
  has no socket timeout; the whole round trip has one deadline
  (`asyncio.timeout`, a timer and no task) of the same length instead.

Connections are redis-py's own (`pool.connection_class` with the pool's
settings), so the URL's TLS, password and database apply as before, and
replies are parsed by redis-py. A connection goes back to the idle list only
after its reply was read in full; one that failed or timed out is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def encode(*args: Arg) -> bytes:
    """Arguments as consecutive RESP bulk strings (str as UTF-8, int in
    decimal: what redis-py sends for them)."""
    out = bytearray()
    for arg in args:
        if isinstance(arg, bytes):
            out += bulk(arg)
        elif isinstance(arg, str):
            out += bulk(arg.encode())
        else:
            out += bulk(b"%d" % arg)
    return bytes(out)


class ScriptCall:
    """A Lua script, called by EVALSHA with arguments encoded by the caller.

    `command(body, parts)` wraps an encoded body (`numkeys`, the keys, the
    arguments: `parts` bulk strings in all) into the EVALSHA command;
    `fallback` into EVAL with the script's text, which Redis runs and caches
    again: the answer to NOSCRIPT after a restart or `SCRIPT FLUSH`.
    """

    def __init__(self, source: str) -> None:
        text = source.encode()
        sha = hashlib.sha1(text).hexdigest().encode()  # what Redis names it by
        self.sha = sha.decode()
        self._evalsha = b"$7\r\nEVALSHA\r\n" + bulk(sha)
        self._eval = b"$4\r\nEVAL\r\n" + bulk(text)

    def command(self, body: bytes, parts: int) -> bytes:
        """EVALSHA with `body`."""
        return b"*%d\r\n%b%b" % (parts + 2, self._evalsha, body)

    def fallback(self, body: bytes, parts: int) -> bytes:
        """EVAL with `body`."""
        return b"*%d\r\n%b%b" % (parts + 2, self._eval, body)


class Lane:
    """Connections for the store's scripts, reused most recent first.

    At most `max_connections` calls are in flight; a call beyond that waits
    for one to finish (up to the timeout), as redis-py's blocking pool did,
    so a burst queues instead of failing. Otherwise no call waits: a
    connection is created when none is idle.
    """

    def __init__(self, pool: ConnectionPool, *, max_connections: int) -> None:
        """Connections like `pool`'s; the pool's socket timeout becomes the
        deadline of each round trip, its connect timeout that of connecting."""
        settings = dict(pool.connection_kwargs)
        timeout = settings.get("socket_timeout")
        self.timeout_s: float | None = None if timeout is None else float(timeout)
        connect_timeout = settings.get("socket_connect_timeout") or timeout
        self._connect_timeout_s: float | None = (
            None if connect_timeout is None else float(connect_timeout)
        )
        settings["socket_timeout"] = None
        self._settings = settings
        self._connection_class = pool.connection_class
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(max_connections)

    @property
    def idle(self) -> int:
        """Open connections waiting for a call."""
        return len(self._idle)

    async def script(self, script: ScriptCall, body: bytes, parts: int) -> Any:
        """Run `script` with the encoded `body`: one round trip, two when
        Redis has to be sent the script again."""
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise RedisConnectionError("No connection available.") from exc
        else:
            await self._slots.acquire()  # returns at once: a slot is free
        try:
            conn = await self._connection()
            clean = False
            try:
                try:
                    reply = await self._round_trip(conn, script.command(body, parts))
                except NoScriptError:
                    reply = await self._round_trip(conn, script.fallback(body, parts))
                clean = True
                return reply
            except ResponseError:
                clean = True  # an error reply, read in full
                raise
            finally:
                # Only a connection whose reply was read in full is reused:
                # on any other one a later call would read this call's reply.
                if clean:
                    self._idle.append(conn)
                else:
                    await conn.disconnect(nowait=True)
        finally:
            self._slots.release()

    async def call(self, script: ScriptCall, keys: list[Arg], args: list[Arg]) -> Any:
        """Run `script` with plain keys and arguments (nothing cached)."""
        return await self.script(script, encode(len(keys), *keys, *args), 1 + len(keys) + len(args))

    async def _connection(self) -> AbstractConnection:
        conn = self._idle.pop() if self._idle else self._connection_class(**self._settings)
        if conn.is_connected:
            try:
                # Unread bytes (never left by this lane) or a server that
                # closed the socket (a restart): start over on a new socket
                # rather than fail this call.
                stale = await conn.can_read()
            except (RedisConnectionError, OSError):
                stale = True
            if stale:
                await conn.disconnect(nowait=True)
        if not conn.is_connected:
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except TimeoutError as exc:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError("Timeout connecting to Redis") from exc
            except BaseException:
                await conn.disconnect(nowait=True)  # cancelled mid-handshake
                raise
        return conn

    async def _round_trip(self, conn: AbstractConnection, command: bytes) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                await conn.send_packed_command(command, check_health=False)
                return await conn.read_response()
        except TimeoutError as exc:
            raise RedisTimeoutError("Timeout reading from Redis") from exc

    async def reset(self) -> None:
        """Close the idle connections (after a connection error: they are
        likely dead too); calls in flight keep theirs."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
