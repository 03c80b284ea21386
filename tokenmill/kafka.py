"""aiokafka producers, consumers and topic creation with the settings that keep the
broker reliable (short sessions and heartbeats, short fetch waits).

Kafka errors are translated into :class:`~tokenmill.errors.StackError` where they enter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from .errors import StackError
from .wire import (
    CONTROL_TOPIC,
    DEAD_LETTER_TOPIC,
    REQUEST_TOPICS,
    SLA_VIOLATIONS_TOPIC,
    TOKEN_EVENTS_TOPIC,
)

#: partitions per topic: keyed by tenant, so one tenant's requests stay in order
DEFAULT_PARTITIONS = 8
ALL_TOPICS: tuple[str, ...] = (
    *REQUEST_TOPICS,
    CONTROL_TOPIC,
    TOKEN_EVENTS_TOPIC,
    DEAD_LETTER_TOPIC,
    SLA_VIOLATIONS_TOPIC,
)

CONSUMER_DEFAULTS: dict[str, Any] = dict(
    session_timeout_ms=3000,
    heartbeat_interval_ms=300,
    rebalance_timeout_ms=3000,
    fetch_max_wait_ms=50,
    enable_auto_commit=False,
    auto_offset_reset="earliest",
)


def normalize_bootstrap(url: str) -> str:
    """``kafka://host:port`` or ``host:port`` → ``host:port``."""
    return url.split("://", 1)[-1].rstrip("/")


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[str] = ALL_TOPICS,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    timeout_s: float = 15.0,
) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=normalize_bootstrap(bootstrap))
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t not in existing]
            if missing:
                try:
                    await admin.create_topics(
                        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing]
                    )
                except TopicAlreadyExistsError:
                    pass  # another process won the race
    except (KafkaError, TimeoutError, OSError) as exc:
        raise StackError(f"Kafka at {bootstrap}: cannot create topics: {exc!r}") from exc
    finally:
        await admin.close()


def producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for the broker's ack (``acks=all``) and batches briefly."""
    opts: dict[str, Any] = dict(acks="all", linger_ms=2, max_batch_size=256 * 1024)
    opts.update(overrides)
    return AIOKafkaProducer(bootstrap_servers=normalize_bootstrap(bootstrap), **opts)


def consumer(bootstrap: str, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    opts = {**CONSUMER_DEFAULTS, **overrides}
    return AIOKafkaConsumer(*topics, bootstrap_servers=normalize_bootstrap(bootstrap), group_id=group_id, **opts)


async def start(client: AIOKafkaProducer | AIOKafkaConsumer, what: str, timeout_s: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await client.start()
    except (KafkaError, TimeoutError, OSError) as exc:
        raise StackError(f"Kafka {what}: cannot connect: {exc!r}; is the stack up?") from exc
