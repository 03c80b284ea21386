"""asyncio Redis clients whose commands are packed by hiredis (C).

redis-py packs commands with hiredis in its sync connections when hiredis is installed,
but its asyncio connections always use the pure-Python packer. tokenmill's hot paths
send Lua calls with thousands of arguments (a worker admitting or committing a slice of
256 requests): the Python packer took ~3 ms per such call, hiredis ~0.4 ms, ~10 % of
the worker host's CPU. These clients use redis-py's own hiredis serializer.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

__all__ = ["async_redis"]

try:
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE
except ImportError:  # pragma: no cover - another redis-py layout: keep its packer
    HIREDIS_AVAILABLE = False


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        return _SERIALIZER.pack(*args)


class _TCP(_HiredisPacking, Connection):
    pass


class _TLS(_HiredisPacking, SSLConnection):
    pass


class _Unix(_HiredisPacking, UnixDomainSocketConnection):
    pass


_BY_SCHEME: dict[str, type[Connection] | type[UnixDomainSocketConnection]] = {
    "redis": _TCP, "rediss": _TLS, "unix": _Unix,
}
if HIREDIS_AVAILABLE:
    _SERIALIZER = HiredisRespSerializer()


def async_redis(url: str, *, blocking: bool = False, **pool_options: Any) -> aredis.Redis:
    """An asyncio client for ``url`` (``redis://``, ``rediss://`` or ``unix://``);
    ``blocking`` pools wait for a free connection instead of opening more."""
    pool_cls = aredis.BlockingConnectionPool if blocking else aredis.ConnectionPool
    conn = _BY_SCHEME.get(urlsplit(url).scheme) if HIREDIS_AVAILABLE else None
    if conn is not None:
        pool_options["connection_class"] = conn
    return aredis.Redis(connection_pool=pool_cls.from_url(url, **pool_options))
