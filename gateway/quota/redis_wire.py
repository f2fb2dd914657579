"""The Redis store's scripts on the wire: pre-encoded commands on connections
kept by the store, so that an admit costs one round trip and little CPU.

Why not redis-py's `Script`, pool and connections for the scripts (measured
on the benchmark's 2-core machine, uvloop, one scope with every limit):

- redis-py spent about 90 us of CPU per admit: 30 us building keys and
  arguments, 17 us encoding them, 19 us taking and returning a pooled
  connection (a condition, a lock, a timer and metrics hooks), the rest in
  `execute_command`. Here what does not change between requests is encoded
  once (`ScriptCall` and the store's admit plans) and an idle connection is
  popped from a list (`Lane`).
- With a socket timeout, redis-py writes every command inside
  `asyncio.wait_for`, which on Python 3.11 starts a task per write: every
  call waits two extra turns of the event loop. A `Lane` call has one
  deadline for the whole round trip (`asyncio.timeout`, a timer, no task).
- Even used directly, a redis-py connection's send, read and health check
  (a stream writer, a stream reader, a buffer, a read with a zero timeout
  to see whether the server closed the socket) took 56 us of CPU and 92 us
  per trivial EVALSHA; a `_ScriptConnection` (one write, replies parsed by
  hiredis, the parser redis-py itself prefers, in the protocol callback)
  takes about 45 us and 77 us. A connection here knows it was closed from
  its own callback, without a syscall.

Connections are opened with the settings of the client's pool: host and
port or Unix socket, TLS (the context redis-py builds from the URL), user
and password or credential provider, database. Errors are redis-py's
exception types, as the breaker and the store expect. A connection goes back
to the idle list only after its reply was read in full; one that failed or
timed out is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Any, cast

import hiredis
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
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


class _ScriptConnection(asyncio.Protocol):
    """One Redis connection: a command, then exactly its reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._waiter: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's are not `asyncio.Transport` subclasses)."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse the reply; bytes nobody waits for close the connection."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # a reply to nothing: the connection's state is unknown
            return
        self._reader.feed(data)
        try:
            reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            waiter.set_exception(RedisConnectionError(f"Protocol error: {exc}"))
            self.close()
            return
        if reply is not False:
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the call in flight, if any."""
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(RedisConnectionError("Connection closed by server."))

    async def request(self, command: bytes) -> Any:
        """Send `command` and return its reply (an error reply raised)."""
        if self.closed or self.transport is None:
            raise RedisConnectionError("Connection closed.")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(command)
        try:
            reply = await waiter
        finally:
            self._waiter = None
        if isinstance(reply, hiredis.ReplyError):
            raise _error(str(reply))
        return reply

    def close(self) -> None:
        """Close the socket."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


def _error(text: str) -> RedisError:
    """An error reply as the redis-py exception of the same meaning."""
    code, _, message = text.partition(" ")
    if code == "NOSCRIPT":
        return NoScriptError(message)
    if code in ("NOAUTH", "WRONGPASS"):
        return AuthenticationError(message)
    return ResponseError(text)


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
        self._path: str | None = settings.get("path")
        self._host: str = settings.get("host", "localhost")
        self._port = int(settings.get("port", 6379))
        self._db = int(settings.get("db") or 0)
        self._username: str | None = settings.get("username")
        self._password: str | None = settings.get("password")
        self._credentials = settings.get("credential_provider")
        self._ssl: ssl.SSLContext | None = None
        if issubclass(pool.connection_class, SSLConnection):
            # redis-py's own reading of the URL's TLS settings (no I/O here).
            self._ssl = pool.connection_class(**settings).ssl_context.get()
        self._idle: list[_ScriptConnection] = []
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
                if clean and not conn.closed:
                    self._idle.append(conn)
                else:
                    conn.close()
        finally:
            self._slots.release()

    async def call(self, script: ScriptCall, keys: list[Arg], args: list[Arg]) -> Any:
        """Run `script` with plain keys and arguments (nothing cached)."""
        return await self.script(script, encode(len(keys), *keys, *args), 1 + len(keys) + len(args))

    async def _connection(self) -> _ScriptConnection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:  # a server that closed it (a restart) said so
                return conn
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._open()
        except TimeoutError as exc:
            raise RedisTimeoutError("Timeout connecting to Redis") from exc

    async def _open(self) -> _ScriptConnection:
        """A new connection, authenticated and on the right database."""
        loop = asyncio.get_running_loop()
        try:
            if self._path is not None:
                _, conn = await loop.create_unix_connection(_ScriptConnection, self._path)
            else:
                _, conn = await loop.create_connection(
                    _ScriptConnection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except OSError as exc:
            where = self._path or f"{self._host}:{self._port}"
            raise RedisConnectionError(f"Error connecting to {where}: {exc}") from exc
        try:
            username, password = self._username, self._password
            if self._credentials is not None:
                credentials = await self._credentials.get_credentials_async()
                username, password = (None, *credentials)[-2:]
            if password:  # as redis-py: an empty password sends no AUTH
                names = (username, password) if username else (password,)
                await conn.request(_command("AUTH", *names))
            if self._db:
                await conn.request(_command("SELECT", self._db))
        except BaseException:
            conn.close()
            raise
        return conn

    async def _round_trip(self, conn: _ScriptConnection, command: bytes) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await conn.request(command)
        except TimeoutError as exc:
            raise RedisTimeoutError("Timeout reading from Redis") from exc

    async def reset(self) -> None:
        """Close the idle connections (after a connection error: they are
        likely dead too); calls in flight keep theirs."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _command(*args: Arg) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n%b" % (len(args), encode(*args))
