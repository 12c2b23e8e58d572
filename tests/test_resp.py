"""The gateway's lean Redis connection (rendezvous.bus.resp) against a real Redis server: replies
in order, error replies as values, reconnection, timeouts, authentication and database."""

import asyncio
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from rendezvous.bus.resp import BlockingLeanRedis, Endpoint, LeanRedis, _Protocol, pack


def test_pack_is_resp() -> None:
    assert pack(b"SET", b"k", b"v\r\n") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"


async def test_batches_keep_their_order_and_error_replies_come_back_as_values(
    r: redis.Redis, redis_url: str
) -> None:
    r.set("text", "x")
    lean = LeanRedis(redis_url, timeout_s=2.0)
    try:
        blob = pack(b"INCR", b"n") + pack(b"XADD", b"text", b"*", b"f", b"v") + pack(b"GET", b"n")
        first, wrong, got = await lean.execute(blob, 3)
        assert first == 1 and got == b"1"
        assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
        # many batches in flight on the one connection at once: each gets its own replies
        replies = await asyncio.gather(*(lean.execute(pack(b"INCR", b"n"), 1) for _ in range(50)))
        assert [reply for (reply,) in replies] == list(range(2, 52))
    finally:
        await lean.close()


async def test_a_killed_connection_is_replaced_and_retried_once(
    r: redis.Redis, redis_url: str
) -> None:
    lean = LeanRedis(redis_url, timeout_s=2.0)
    try:
        (first_id,) = await lean.execute(pack(b"CLIENT", b"ID"), 1)
        r.client_kill_filter(_id=first_id)
        await asyncio.sleep(0.05)  # the loss is noticed while idle: the next use reconnects
        (second_id,) = await lean.execute(pack(b"CLIENT", b"ID"), 1, retry=False)
        assert second_id != first_id
        r.client_kill_filter(_id=second_id)
        # killed and not yet noticed: the command fails with the connection...
        with pytest.raises(redis.ConnectionError):
            await lean.execute(pack(b"PING"), 1, retry=False)
        (third_id,) = await lean.execute(pack(b"CLIENT", b"ID"), 1)
        r.client_kill_filter(_id=third_id)
        # ...unless retried once, on a fresh connection
        assert await lean.execute(pack(b"PING"), 1) == [b"PONG"]
    finally:
        await lean.close()


async def test_a_reply_late_past_the_timeout_fails_the_batch_and_drops_the_connection(
    redis_url: str,
) -> None:
    lean = LeanRedis(redis_url, timeout_s=0.2)
    try:
        (before,) = await lean.execute(pack(b"CLIENT", b"ID"), 1)
        t0 = time.monotonic()
        read = pack(b"XREAD", b"BLOCK", b"2000", b"STREAMS", b"nothing", b"$")
        with pytest.raises(redis.TimeoutError):
            await lean.execute(read, 1)
        assert time.monotonic() - t0 < 1.0
        (after,) = await lean.execute(pack(b"CLIENT", b"ID"), 1)
        assert after != before  # the blocked XREAD's late reply cannot be taken for this one
        # a batch can wait longer than the connection's default
        assert await lean.execute(pack(b"XREAD", b"BLOCK", b"300", b"STREAMS", b"nothing", b"$"),
                                  1, timeout_s=2.0) == [None]  # fmt: skip
    finally:
        await lean.close()


async def test_close_ends_a_blocked_read_at_once(redis_url: str) -> None:
    lean = LeanRedis(redis_url, timeout_s=5.0)
    read = asyncio.create_task(
        lean.execute(pack(b"XREAD", b"BLOCK", b"4000", b"STREAMS", b"nothing", b"$"), 1)
    )
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await lean.close()
    with pytest.raises(redis.ConnectionError):
        await read
    assert time.monotonic() - t0 < 0.5


@pytest.fixture
def acl_user(r: redis.Redis) -> Iterator[tuple[str, str]]:
    r.acl_setuser("lean", enabled=True, passwords=["+s3cret"], keys="*", commands=["+@all"])
    yield "lean", "s3cret"
    r.acl_deluser("lean")


async def test_user_password_and_database_from_the_url(
    r: redis.Redis, redis_url: str, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    where = urlsplit(redis_url)
    lean = LeanRedis(f"redis://{user}:{password}@{where.netloc}/3", timeout_s=2.0)
    try:
        assert await lean.execute(pack(b"SET", b"in-three", b"1"), 1) == [b"OK"]
        assert await lean.execute(pack(b"ACL", b"WHOAMI"), 1) == [user.encode()]
    finally:
        await lean.close()
    db3 = redis.Redis(host=where.hostname, port=where.port, db=3)
    try:
        assert db3.get("in-three") == b"1" and r.get("in-three") is None
        db3.flushdb()
    finally:
        db3.close()
    wrong = LeanRedis(f"redis://{user}:nope@{where.netloc}/0", timeout_s=2.0)
    with pytest.raises(redis.AuthenticationError):
        await wrong.connect()


async def test_nothing_listening_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lean = LeanRedis(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
    with pytest.raises(redis.ConnectionError, match="cannot connect"):
        await lean.execute(pack(b"PING"), 1)


def test_unsupported_tls_options_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="ssl_ciphers"):
        LeanRedis("rediss://127.0.0.1:6380/0?ssl_ciphers=x", timeout_s=1.0)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


async def test_a_loading_server_and_a_split_reply_are_told_apart() -> None:
    protocol = _Protocol(asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    loading = protocol.send(b"", 1)
    split = protocol.send(b"", 1)
    protocol.data_received(b"-LOADING Redis is loading the dataset in memory\r\n$5\r\nhel")
    assert isinstance(loading.result()[0], redis.BusyLoadingError)
    assert not split.done()
    protocol.data_received(b"lo\r\n")
    assert split.result() == [b"hello"]
    unasked = protocol.send(b"", 1)
    protocol.data_received(b"+OK\r\n+EXTRA\r\n")
    assert unasked.result() == [b"OK"] and transport.aborted
    with pytest.raises(redis.ConnectionError, match="nobody asked"):
        protocol.send(b"", 1)


def test_the_blocking_connection_of_a_worker(r: redis.Redis, acl_user: tuple[str, str]) -> None:
    """Address, user, password and database come from the worker's redis-py client."""
    user, password = acl_user
    kwargs = r.connection_pool.connection_kwargs
    client = redis.Redis(host=kwargs["host"], port=kwargs["port"], db=2, username=user,
                         password=password)  # fmt: skip
    lean = BlockingLeanRedis(Endpoint.of_client(client), timeout_s=2.0)
    try:
        client.set("text", "x")
        blob = pack(b"INCR", b"n") + pack(b"HSET", b"text", b"f", b"v") + pack(b"ACL", b"WHOAMI")
        first, wrong, whoami = lean.execute(blob, 3)
        assert first == 1 and whoami == user.encode()
        assert isinstance(wrong, redis.ResponseError)
        assert client.get("n") == b"1" and r.get("n") is None  # database 2
        # a connection killed between uses: the retry takes a fresh one; without retry it fails
        (first_id,) = lean.execute(pack(b"CLIENT", b"ID"), 1)
        r.client_kill_filter(_id=first_id)
        with pytest.raises(redis.ConnectionError):
            lean.execute(pack(b"PING"), 1, retry=False)
        (second_id,) = lean.execute(pack(b"CLIENT", b"ID"), 1)
        r.client_kill_filter(_id=second_id)
        assert lean.execute(pack(b"PING"), 1) == [b"PONG"]
        # a reply later than the timeout: an error, and the next command a fresh connection
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            lean.execute(pack(b"BLPOP", b"empty", b"2"), 1, timeout_s=0.2)
        assert time.monotonic() - t0 < 1.0
        assert lean.execute(pack(b"PING"), 1) == [b"PONG"]
        client.flushdb()
    finally:
        lean.close()
        client.close()
