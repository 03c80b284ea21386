"""tokenmill's asyncio Redis clients (hiredis packing) against a real Redis: the same
bytes reach the server as with redis-py's own packer, for every kind of argument."""

from __future__ import annotations

import asyncio

from redis.asyncio.connection import Connection

from tokenmill.redis_client import async_redis


def test_arguments_round_trip_like_redis_pys_own_packer(redis_url: str) -> None:
    values = [b"\x00\xff raw", "é unicode", 7, -3, 1.5, 1e-7, "", "x" * 70_000]

    async def main() -> None:
        client = async_redis(redis_url)
        conn_cls = client.connection_pool.connection_class
        assert issubclass(conn_cls, Connection) and conn_cls is not Connection
        try:
            echo = client.register_script("return ARGV")
            assert await echo(keys=[], args=values) == await plain_echo(values)
            keys = [f"tokenmill:test:{i}" for i in range(3000)]  # a slice-sized call
            count = client.register_script("return #KEYS")
            assert await count(keys=keys, args=[]) == 3000
            pipe = client.pipeline(transaction=False)
            pipe.set("tokenmill:test:v", values[0])
            pipe.get("tokenmill:test:v")
            assert await pipe.execute() == [True, values[0]]
        finally:
            await client.aclose()

    async def plain_echo(args: list[object]) -> object:
        from redis.asyncio import Redis

        plain = Redis.from_url(redis_url)
        try:
            return await plain.register_script("return ARGV")(keys=[], args=args)
        finally:
            await plain.aclose()

    asyncio.run(main())
