"""The state scripts' pipelined Redis connection: order, errors, silence, handshake."""

import asyncio
import os
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guillotina_amqp.state.redis_pipe import RedisPipe


def _client(**options) -> Redis:
    host, _, port = os.environ["REDIS"].partition(":")
    return Redis(host=host, port=int(port), **options)


@pytest.fixture
async def key():
    name = f"test-pipe-{uuid.uuid4().hex}"
    yield name
    client = _client()
    await client.delete(name)
    await client.aclose()


async def test_concurrent_calls_get_their_own_replies_in_one_write(key):
    pipe = await RedisPipe.open(_client())
    try:
        replies = await asyncio.gather(*(pipe.call("ECHO", f"reply-{i}") for i in range(500)))
        assert replies == [f"reply-{i}".encode() for i in range(500)]
        counted = await asyncio.gather(*(pipe.call("INCR", key) for _ in range(200)))
        assert sorted(counted) == list(range(1, 201)), "each INCR answered once, none lost or swapped"
    finally:
        pipe.close()


async def test_an_error_reply_fails_its_own_call_only(key):
    pipe = await RedisPipe.open(_client())
    try:
        unknown_script = pipe.call("EVALSHA", "0" * 40, 0)
        wrong_type = pipe.call("LPUSH", key, "x")
        fine = pipe.call("ECHO", "still in step")
        with pytest.raises(NoScriptError):
            await unknown_script
        assert await wrong_type == 1
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.call("INCR", key)
        assert await fine == b"still in step"
        assert await pipe.call("ECHO", "after the errors") == b"after the errors"
    finally:
        pipe.close()


async def test_the_client_database_is_selected(key):
    pipe = await RedisPipe.open(_client(db=3))
    try:
        await pipe.call("SET", key, "in db 3")
    finally:
        pipe.close()
    db3, db0 = _client(db=3), _client()
    try:
        assert await db3.get(key) == b"in db 3"
        assert await db0.get(key) is None
    finally:
        await db3.delete(key)
        await db3.aclose()
        await db0.aclose()


async def test_a_killed_connection_fails_the_waiting_calls_and_the_next_ones():
    pipe = await RedisPipe.open(_client())
    admin = _client()
    try:
        client_id = await pipe.call("CLIENT", "ID")
        waiting = pipe.call("BLPOP", f"test-pipe-{uuid.uuid4().hex}", 0)
        assert await admin.execute_command("CLIENT", "KILL", "ID", client_id) == 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 10)
        assert not pipe.usable
        with pytest.raises(RedisConnectionError):
            await pipe.call("PING")
    finally:
        pipe.close()
        await admin.aclose()


async def test_silence_counts_from_the_first_reply_owed_not_from_the_last_one_received():
    pipe = await RedisPipe.open(_client())
    pipe.timeout = 0.5
    try:
        assert await pipe.call("PING") == b"PONG"  # starts the watchdog; nothing owed after it
        await asyncio.sleep(0.4)
        # owed from now on: the watchdog due 0.5 s after the PING must not count the idle 0.4 s
        assert await asyncio.wait_for(pipe.call("BLPOP", f"test-pipe-{uuid.uuid4().hex}", 0.2), 10) is None
        assert pipe.usable
    finally:
        pipe.close()


async def _fake_redis(reply: bytes | None):
    """A server that answers every command with `reply`, or never answers (None)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            if reply is not None:
                writer.write(reply)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_silent_server_counts_as_down():
    server, port = await _fake_redis(None)
    async with server:
        client = Redis(host="127.0.0.1", port=port)
        pipe = await RedisPipe.open(client)
        pipe.timeout = 0.3
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(pipe.call("PING"), 10)
        assert not pipe.usable


async def test_a_demoted_master_closes_the_connection_so_the_next_one_asks_again():
    server, port = await _fake_redis(b"-READONLY You can't write against a read only replica.\r\n")
    async with server:
        pipe = await RedisPipe.open(Redis(host="127.0.0.1", port=port))
        with pytest.raises(RedisConnectionError, match="replica"):
            await asyncio.wait_for(pipe.call("SET", "k", "v"), 10)
        assert not pipe.usable
