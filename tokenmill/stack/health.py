"""Live health checks, one per kind of service, each bounded by a short timeout.

A probe takes the service's address and a timeout and returns None when the service
answers its own protocol, else raises :class:`StackError` saying why. ``PROBES`` maps
the names a :class:`~tokenmill.stack.spec.ServiceSpec` may choose to the probe.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from ..errors import StackError
from .urls import mask_text

Probe = Callable[[str, float], None]

DEFAULT_TIMEOUT_S = 2.0


def _host_port(address: str) -> tuple[str, int]:
    """First ``host:port`` of an address (``host:port[,…]`` or a URL)."""
    first = address.split(",")[0]
    parsed = urlsplit(first if "://" in first else f"//{first}")
    if not parsed.hostname or not parsed.port:
        raise StackError(f"no host:port in address {mask_text(address)!r}")
    return parsed.hostname, parsed.port


def tcp(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Something accepts TCP connections at ``host:port``."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise StackError(f"no connection to {host}:{port}: {exc.strerror or exc}") from exc


def kafka(bootstrap: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The broker answers a Kafka metadata request (aiokafka bootstrap)."""
    # A TCP check first: aiokafka logs an ERROR line for every refused connection.
    tcp(bootstrap, timeout_s)
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    async def metadata() -> None:
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap, request_timeout_ms=max(int(timeout_s * 1000), 100)
        )
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
        finally:
            await client.close()

    try:
        _run_coroutine(metadata)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise StackError(f"kafka metadata request failed: {type(exc).__name__}: {exc}") from exc


def _run_coroutine(factory: Callable[[], Coroutine[object, object, None]]) -> None:
    """Run to completion, also when called from inside an event loop (in a thread then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(factory())
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(factory())).result()


def redis(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The server answers PING."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        if not client.ping():
            raise StackError("redis PING got no PONG")
    except redis_lib.RedisError as exc:
        raise StackError(f"redis PING failed: {mask_text(str(exc), url)}") from exc
    finally:
        client.close()


def database(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The database answers ``SELECT 1``."""
    import sqlalchemy as sa

    connect_args: dict[str, object] = {}
    if url.startswith("sqlite"):
        connect_args["timeout"] = timeout_s
    elif url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(int(timeout_s), 1)
    try:
        engine = sa.create_engine(url, connect_args=connect_args, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        # SQLAlchemy messages repeat the URL; keep its password out.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StackError(f"SELECT 1 failed: {mask_text(first, url)}") from exc


def http(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """An HTTP server answers (any status below 500; 401 means it is up behind auth)."""
    import httpx

    try:
        status = httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError as exc:
        raise StackError(f"HTTP GET failed: {type(exc).__name__}") from exc
    if status >= 500:
        raise StackError(f"HTTP GET answered {status}")


def none(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """No protocol check: the process being alive is all there is to know."""


PROBES: dict[str, Probe] = {
    "kafka": kafka,
    "redis": redis,
    "database": database,
    "tcp": tcp,
    "http": http,
    "pid": none,
}


def probe(kind: str) -> Probe:
    """The probe named ``kind``.

    Raises:
        StackError: no such probe (the message lists the known ones).
    """
    try:
        return PROBES[kind]
    except KeyError:
        raise StackError(f"unknown health probe {kind!r}; known: {', '.join(PROBES)}") from None


def check(kind: str, address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """None when healthy, else the reason (already free of secrets)."""
    try:
        probe(kind)(address, timeout_s)
    except StackError as exc:
        return mask_text(str(exc), address)
    return None
