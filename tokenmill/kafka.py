"""aiokafka producers, consumers and topic creation, with client settings chosen here,
once, valid for Apache Kafka (the deployed stack) and the embedded Tansu broker alike.

Kafka errors are translated into :class:`~tokenmill.errors.StackError` where they enter.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

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

#: replication factor of the topics :func:`ensure_topics` creates: the embedded broker and
#: the compose stack have one broker. A multi-broker cluster pre-creates the topics with
#: its own factor; ensure_topics only creates the missing ones.
REPLICATION_FACTOR = 1

#: Consumer settings every tokenmill consumer starts from; each value is valid for
#: Apache Kafka's default broker config AND for the embedded broker (Tansu).
CONSUMER_DEFAULTS: dict[str, Any] = {
    # How long a silent member stays in its group. Apache Kafka refuses a JoinGroup
    # below group.min.session.timeout.ms (default 6000) with INVALID_SESSION_TIMEOUT,
    # so 6 s is the floor; it is also how long a SIGKILLed member's partitions wait
    # before they move, so no longer than that.
    "session_timeout_ms": 6000,
    # Members learn of a rebalance through the heartbeat reply: a short interval moves
    # partitions quickly. Kafka's rule: well under the session timeout (≤ 1/3 of it).
    "heartbeat_interval_ms": 500,
    # How long the coordinator waits for every member to rejoin during a rebalance;
    # a member finishes its batch in flight first (ledger.streams: up to 2 s), so
    # leave room for that. Must stay below request_timeout_ms (40 s default), as the
    # JoinGroup request is held open that long.
    "rebalance_timeout_ms": 6000,
    # Tansu holds a fetch for the whole wait even with records waiting: keep it short.
    "fetch_max_wait_ms": 50,
    # Offsets are committed by hand, after the effect is durable (at-least-once).
    "enable_auto_commit": False,
    # A new group reads from the start: "latest" is unreliable on Tansu (end offsets).
    "auto_offset_reset": "earliest",
}

#: Producer settings every tokenmill producer starts from (same rule as above).
PRODUCER_DEFAULTS: dict[str, Any] = {
    # Wait for every in-sync replica: an acknowledged request survives a broker loss.
    "acks": "all",
    # Brief batching: a few ms of latency for far fewer requests to the broker.
    "linger_ms": 2,
    "max_batch_size": 256 * 1024,
    # No idempotent producer or transactions: Tansu has neither, and every effect is
    # idempotent by request id instead (ARCHITECTURE: at-least-once everywhere).
    "enable_idempotence": False,
}


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
                    new = [NewTopic(t, partitions, REPLICATION_FACTOR) for t in missing]
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass  # another process won the race
    except (KafkaError, TimeoutError, OSError) as exc:
        raise StackError(f"Kafka at {bootstrap}: cannot create topics: {exc!r}") from exc
    finally:
        await admin.close()


def producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for the broker's ack (``acks=all``) and batches briefly."""
    opts: dict[str, Any] = {**PRODUCER_DEFAULTS, "partitioner": key_partition, **overrides}
    return AIOKafkaProducer(bootstrap_servers=normalize_bootstrap(bootstrap), **opts)


@functools.lru_cache(maxsize=4096)
def _key_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def key_partition(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client) with the
    hash cached: keys are tenant names, few and repeated, and murmur2 is pure Python."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[_key_hash(key) % len(all_partitions)]


async def send_batched(
    producer: AIOKafkaProducer, records: Sequence[tuple[str, bytes, bytes]]
) -> list[asyncio.Future[Any]]:
    """Send ``(topic, key, value)`` records as one record batch per topic-partition;
    returns each record's delivery future (shared by the records of a batch).

    ``producer.send`` walks aiokafka's Python accumulator and makes a future per
    message; a batch appends each record in its builder. Every record goes to the
    partition ``send`` would choose (:func:`key_partition`), and a partition's batches
    are delivered in order, so per-key order is kept.

    Raises:
        StackError: Kafka refused a batch, or a record is larger than a batch.
    """
    delivered: dict[int, asyncio.Future[Any]] = {}  # id(batch) → its delivery
    batch_of: list[Any] = []  # each record's batch (keeps every batch alive)
    try:
        partitions: dict[str, list[int]] = {}
        open_batches: dict[tuple[str, int], Any] = {}
        for topic, key, value in records:
            parts = partitions.get(topic)
            if parts is None:
                parts = partitions[topic] = sorted(await producer.partitions_for(topic))
            tp = (topic, key_partition(key, parts, parts))
            batch = open_batches.get(tp)
            if batch is None or batch.append(key=key, value=value, timestamp=None) is None:
                if batch is not None:  # full: send it, start another
                    delivered[id(batch)] = await producer.send_batch(batch, tp[0], partition=tp[1])
                batch = open_batches[tp] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise StackError(f"Kafka: a {len(value)}-byte record for {topic} does not fit "
                                     f"in a batch (max_batch_size)")
            batch_of.append(batch)
        for (topic, part), batch in open_batches.items():
            delivered[id(batch)] = await producer.send_batch(batch, topic, partition=part)
    except KafkaError as exc:
        raise StackError(f"Kafka: cannot send: {exc!r}") from exc
    return [delivered[id(batch)] for batch in batch_of]


async def publish(producer: AIOKafkaProducer, records: Sequence[tuple[str, bytes, bytes]]) -> None:
    """Send ``(topic, key, value)`` records and return once the broker acknowledged all
    (one record: a plain send; more: :func:`send_batched`).

    Raises:
        StackError: Kafka did not take them.
    """
    try:
        if len(records) == 1:
            topic, key, value = records[0]
            await producer.send_and_wait(topic, value, key=key)
            return
        futures = await send_batched(producer, records)
        await asyncio.gather(*set(futures))
    except KafkaError as exc:
        raise StackError(f"Kafka: requests not accepted: {exc!r}") from exc


def consumer(bootstrap: str, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    opts = {**CONSUMER_DEFAULTS, **overrides}
    return AIOKafkaConsumer(*topics, bootstrap_servers=normalize_bootstrap(bootstrap), group_id=group_id, **opts)


async def start(client: AIOKafkaProducer | AIOKafkaConsumer, what: str, timeout_s: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await client.start()
    except (KafkaError, TimeoutError, OSError) as exc:
        raise StackError(f"Kafka {what}: cannot connect: {exc!r}; is the stack up?") from exc
