"""The Redis store's script lane: one round trip per call, connections reused
only when clean, a bounded number of them, recovery after a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.quota.redis_store import connect
from gateway.quota.redis_wire import Lane, ScriptCall, encode
from tests.support.processes import RedisServer

ECHO = ScriptCall("return ARGV[1]")
BUSY = ScriptCall(
    """
local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local stop = ms() + tonumber(ARGV[1])
while ms() < stop do end
return 'late'
"""
)


def lane_for(server: RedisServer, *, timeout_s: float = 2.0, max_connections: int = 8) -> Lane:
    return Lane(
        connect(server.url, timeout_s=timeout_s).connection_pool, max_connections=max_connections
    )


async def clients(server: RedisServer) -> int:
    """Connections the server has, this test's admin connection excluded."""
    admin = Redis.from_url(server.url)
    try:
        listed = await admin.client_list()
        return len(listed) - 1
    finally:
        await admin.aclose()


def test_encode_matches_what_redis_py_sends() -> None:
    args = ("k", b"\x00v\r\n", 42, -7, "é", "")
    packed = b"".join(Connection().pack_command("ECHO", *args))
    assert packed == b"*7\r\n$4\r\nECHO\r\n" + encode(*args)


async def test_sequential_calls_share_one_connection(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    for n in range(5):
        assert await lane.call(ECHO, [], [f"v{n}"]) == f"v{n}".encode()
    assert lane.idle == 1
    assert await clients(redis_server) == 1
    await lane.reset()


async def test_a_script_flush_costs_one_more_round_trip(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    assert await lane.call(ECHO, [], ["a"]) == b"a"
    admin = Redis.from_url(redis_server.url)
    await admin.script_flush()
    assert await lane.call(ECHO, [], ["b"]) == b"b"  # NOSCRIPT, then EVAL
    assert await admin.script_exists(ECHO.sha) == [True]
    await admin.aclose()
    await lane.reset()


async def test_an_error_reply_leaves_the_connection_usable(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    with pytest.raises(ResponseError):
        await lane.call(ScriptCall("return redis.error_reply('nope')"), [], [])
    assert lane.idle == 1
    assert await lane.call(ECHO, [], ["after"]) == b"after"
    await lane.reset()


async def test_a_timed_out_call_never_hands_its_reply_to_the_next(
    redis_server: RedisServer,
) -> None:
    lane = lane_for(redis_server, timeout_s=0.1)
    assert await lane.call(ECHO, [], ["warm"]) == b"warm"
    with pytest.raises(RedisTimeoutError):
        await lane.call(BUSY, [], [300])
    assert lane.idle == 0  # closed, with the late reply still on its way
    await asyncio.sleep(0.3)  # Redis is busy with the script until then
    assert await lane.call(ECHO, [], ["mine"]) == b"mine"
    await lane.reset()


async def test_a_burst_beyond_the_limit_waits_for_a_connection(
    redis_server: RedisServer,
) -> None:
    lane = lane_for(redis_server, max_connections=2)
    replies = await asyncio.gather(*(lane.call(ECHO, [], [str(n)]) for n in range(20)))
    assert replies == [str(n).encode() for n in range(20)]
    assert lane.idle <= 2
    assert await clients(redis_server) <= 2
    await lane.reset()


async def test_a_cancelled_call_closes_its_connection(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    call = asyncio.ensure_future(lane.call(BUSY, [], [200]))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert lane.idle == 0
    await asyncio.sleep(0.25)
    assert await lane.call(ECHO, [], ["fresh"]) == b"fresh"
    await lane.reset()


async def test_a_restarted_server_costs_no_failed_call(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    assert await lane.call(ECHO, [], ["before"]) == b"before"
    redis_server.restart()
    await asyncio.sleep(0.05)  # the event loop sees the old socket close
    assert await lane.call(ECHO, [], ["after"]) == b"after"
    await lane.reset()


SET_KEY = ScriptCall("redis.call('SET', KEYS[1], ARGV[1]) return 1")


@contextlib.asynccontextmanager
async def password_required(server: RedisServer, password: str) -> AsyncIterator[None]:
    """The server asks for `password` inside the block."""
    admin = Redis.from_url(server.url)
    await admin.config_set("requirepass", password)
    try:
        yield
    finally:
        await admin.execute_command("AUTH", password)
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_password_and_database_from_the_url_apply(redis_server: RedisServer) -> None:
    async with password_required(redis_server, "s3cret"):
        base = f"redis://:s3cret@127.0.0.1:{redis_server.port}"
        lane = Lane(connect(f"{base}/2", timeout_s=2.0).connection_pool, max_connections=2)
        assert await lane.call(SET_KEY, ["wire:db"], ["two"]) == 1
        await lane.reset()
        for db, expected in ((2, b"two"), (0, None)):
            reader = Redis.from_url(f"{base}/{db}")
            assert await reader.get("wire:db") == expected  # written to database 2 only
            await reader.aclose()


async def test_a_wrong_password_is_an_authentication_error(redis_server: RedisServer) -> None:
    async with password_required(redis_server, "s3cret"):
        url = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
        lane = Lane(connect(url, timeout_s=2.0).connection_pool, max_connections=2)
        with pytest.raises(AuthenticationError):
            await lane.call(ECHO, [], ["x"])
        assert lane.idle == 0  # the refused connection was not kept


async def test_a_unix_socket_url_is_served(redis_server: RedisServer) -> None:
    lane = Lane(connect(redis_server.unix_url, timeout_s=2.0).connection_pool, max_connections=2)
    assert await lane.call(ECHO, [], ["over the socket"]) == b"over the socket"
    assert lane.idle == 1
    await lane.reset()


async def test_a_refused_connection_is_a_connection_error() -> None:
    server = RedisServer()  # never started: nothing listens on its port
    lane = Lane(connect(server.url, timeout_s=1.0).connection_pool, max_connections=2)
    with pytest.raises(RedisConnectionError):
        await lane.call(ECHO, [], ["x"])


async def test_replies_keep_their_types(redis_server: RedisServer) -> None:
    lane = lane_for(redis_server)
    script = ScriptCall("return {1, 'two', {3}}")
    assert await lane.call(script, [], []) == [1, b"two", [3]]
    await lane.reset()
