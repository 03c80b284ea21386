"""Which copies of each service are alive, and what each is doing, in Redis.

Every long-running service process (scheduler, stream processor, batch runner, webhook
dispatcher, gateway) announces itself about once a second in one Redis hash,
``tokenmill:presence``: field ``<service>/<instance>`` → :class:`Instance` JSON. A copy
that stops cleanly removes its field; one that dies drops out once its last
announcement is older than the reader's timeout (and the reader deletes it). Copies on
other machines share the hash, so ``tokenmill status`` lists every copy of a deployed
stack, which one is active, and its lag, wherever it runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis
import redis.asyncio as aredis

from .logs import get_logger

__all__ = [
    "PRESENCE_KEY",
    "Instance",
    "Role",
    "announce",
    "instance_id",
    "live_instances",
    "live_instances_async",
    "run_presence",
    "withdraw",
]

log = get_logger(__name__)

PRESENCE_KEY = "tokenmill:presence"

#: ``active``: holds its service's lease (it acts); ``standby``: waits for the lease;
#: ``copy``: one of several equal copies sharing the work
Role = Literal["active", "standby", "copy"]


@dataclass(frozen=True)
class Instance:
    """One live copy of a service, as it last announced itself."""

    service: str
    instance: str  #: ``host:pid`` unless given
    role: Role
    ts: float  #: epoch seconds of the announcement
    detail: Mapping[str, Any] = field(default_factory=dict)  #: e.g. ``lag``, ``pools``

    @property
    def field(self) -> str:
        return f"{self.service}/{self.instance}"


def instance_id() -> str:
    """This process's instance name: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def announce(
    client: aredis.Redis,
    service: str,
    *,
    role: Role = "copy",
    detail: Mapping[str, Any] | None = None,
    instance: str | None = None,
) -> Instance:
    """Write one announcement now and return it."""
    inst = Instance(service, instance or instance_id(), role, time.time(), dict(detail or {}))
    await client.hset(PRESENCE_KEY, inst.field, json.dumps(asdict(inst)))
    return inst


async def withdraw(client: aredis.Redis, service: str, instance: str | None = None) -> None:
    """Remove this copy's announcement (clean stop)."""
    await client.hdel(PRESENCE_KEY, f"{service}/{instance or instance_id()}")


async def run_presence(
    client: aredis.Redis,
    service: str,
    stop: asyncio.Event,
    describe: Callable[[], tuple[Role, Mapping[str, Any]]] = lambda: ("copy", {}),
    *,
    interval_s: float = 1.0,
    instance: str | None = None,
) -> None:
    """Announce ``describe()`` every ``interval_s`` until ``stop``, then withdraw.

    A Redis error skips one announcement (logged) rather than stopping the service:
    presence is for operators, never a reason to stop serving.
    """
    name = instance or instance_id()
    try:
        while not stop.is_set():
            try:
                role, detail = describe()
                await announce(client, service, role=role, detail=detail, instance=name)
            except (redis.RedisError, OSError) as exc:
                log.warning("presence.announce_failed", service=service, error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
    finally:
        try:
            await withdraw(client, service, name)
        except (redis.RedisError, OSError):
            pass  # it ages out on its own


def _parse(raw: bytes | str) -> Instance | None:
    try:
        d = json.loads(raw)
        return Instance(d["service"], d["instance"], d["role"], float(d["ts"]), d.get("detail") or {})
    except (ValueError, KeyError, TypeError):
        return None


def _split(
    entries: Mapping[bytes | str, bytes | str], oldest: float
) -> tuple[list[Instance], list[bytes | str]]:
    live, stale = [], []
    for key, raw in entries.items():
        inst = _parse(raw)
        if inst is None or inst.ts < oldest:
            stale.append(key)
        else:
            live.append(inst)
    return sorted(live, key=lambda i: (i.service, i.instance)), stale


def live_instances(client: redis.Redis, *, timeout_s: float = 5.0) -> list[Instance]:
    """Every copy that announced itself within ``timeout_s``, by service then instance;
    older entries are deleted."""
    live, stale = _split(client.hgetall(PRESENCE_KEY), time.time() - timeout_s)
    if stale:
        client.hdel(PRESENCE_KEY, *stale)
    return live


async def live_instances_async(client: aredis.Redis, *, timeout_s: float = 5.0) -> list[Instance]:
    """Async :func:`live_instances`."""
    live, stale = _split(await client.hgetall(PRESENCE_KEY), time.time() - timeout_s)
    if stale:
        await client.hdel(PRESENCE_KEY, *stale)
    return live
