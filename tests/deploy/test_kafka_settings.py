"""The Kafka client settings (tokenmill/kafka.py) fit Apache Kafka's default broker
limits as well as the embedded broker: a real Kafka refuses a consumer group whose
session timeout lies outside group.{min,max}.session.timeout.ms."""

from __future__ import annotations

from tokenmill import kafka

#: Apache Kafka's broker defaults (KIP-735: the max is 30 min)
GROUP_MIN_SESSION_TIMEOUT_MS = 6000
GROUP_MAX_SESSION_TIMEOUT_MS = 1_800_000
AIOKAFKA_REQUEST_TIMEOUT_MS = 40_000


def test_consumer_defaults_fit_apache_kafka() -> None:
    c = kafka.CONSUMER_DEFAULTS
    assert GROUP_MIN_SESSION_TIMEOUT_MS <= c["session_timeout_ms"] <= GROUP_MAX_SESSION_TIMEOUT_MS
    assert c["heartbeat_interval_ms"] * 3 <= c["session_timeout_ms"]
    assert c["session_timeout_ms"] <= c["rebalance_timeout_ms"] < AIOKAFKA_REQUEST_TIMEOUT_MS
    assert c["enable_auto_commit"] is False


async def test_every_consumer_and_producer_starts_from_the_defaults() -> None:
    consumer = kafka.consumer("127.0.0.1:1", "t", group_id="g")  # not started: no broker
    assert consumer._session_timeout_ms == kafka.CONSUMER_DEFAULTS["session_timeout_ms"]
    assert consumer._heartbeat_interval_ms == kafka.CONSUMER_DEFAULTS["heartbeat_interval_ms"]
    assert consumer._rebalance_timeout_ms == kafka.CONSUMER_DEFAULTS["rebalance_timeout_ms"]
    assert kafka.PRODUCER_DEFAULTS["acks"] == "all"
    assert kafka.PRODUCER_DEFAULTS["enable_idempotence"] is False  # Tansu has none
