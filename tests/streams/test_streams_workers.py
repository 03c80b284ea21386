"""Real broker, real ``tokenmill streams`` worker processes, SQLite and PostgreSQL: the
ledger's totals are exact after redelivery, a SIGKILL mid-batch, a rebalance between two
workers and a drain on SIGTERM; bad events are dead-lettered while processing goes on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import streams_helpers as st
from streams_helpers import Workers
from tokenmill.config import Settings
from tokenmill.ledger import Period, invoice, make_engine, session_factory, transaction
from tokenmill.ledger.streams import EXIT_DRAIN_TIMEOUT

pytestmark = pytest.mark.slow

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Expected:
    requests: int
    input_tokens: int
    output_tokens: int
    amount: Decimal
    by_tenant: dict[str, Decimal]


def expected(events: list[dict], settings: Settings) -> Expected:
    """Totals computed here from the price cards, independently of tokenmill.pricing."""
    amount = Decimal(0)
    by_tenant: dict[str, Decimal] = {}
    for e in events:
        card = settings.price_card(e["model"], datetime.fromtimestamp(e["finished_at"], UTC))
        cost = (card.input_per_million * e["prompt_tokens"]
                + card.output_per_million * e["completion_tokens"]) / MILLION  # fmt: skip
        if e["priority"] == "batch":
            cost *= 1 - card.batch_discount
        amount += cost
        by_tenant[e["tenant"]] = by_tenant.get(e["tenant"], Decimal(0)) + cost
    return Expected(
        len(events), sum(e["prompt_tokens"] for e in events),
        sum(e["completion_tokens"] for e in events), amount, by_tenant,
    )  # fmt: skip


def assert_exact(url: str, events: list[dict], settings: Settings) -> None:
    exp = expected(events, settings)
    got = st.ledger_totals(url)
    assert (got.usage_records, got.charges, got.sla_records) == (exp.requests,) * 3
    assert (got.input_tokens, got.output_tokens) == (exp.input_tokens, exp.output_tokens)
    assert (got.minute_requests, got.minute_input_tokens, got.minute_output_tokens) == (
        exp.requests, exp.input_tokens, exp.output_tokens,
    )  # fmt: skip
    assert got.amount == exp.amount  # exact Decimal equality, not approximate
    # Invoices per tenant: the total is exactly the sum of that tenant's entries.
    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as s:
            for tenant, amount in exp.by_tenant.items():
                inv = invoice(s, tenant, Period.month(now.year, now.month))
                assert inv.total == amount
                assert sum(ln.amount for ln in inv.lines) == amount
    finally:
        engine.dispose()


def test_10k_events_exact_and_redelivery_changes_nothing(
    workers: Workers, settings: Settings
) -> None:
    events = st.mixed_events(10_000, prefix="exact")
    workers.publish(events)
    worker = workers.start()
    workers.wait_recorded(10_000)
    assert_exact(workers.database_url, events, settings)

    # The same 10,000 events delivered again, then one marker per partition: once every
    # marker is recorded, each partition has been read past the replayed events.
    before = st.ledger_totals(workers.database_url)
    workers.publish(events)
    markers = [st.finished_event(f"marker-{p}", tenant="alpha") for p in range(8)]
    for p, m in enumerate(markers):
        st.publish(workers.bootstrap, workers.topic, [(b"alpha", st.encode(m))], partition=p)
    workers.wait_recorded(10_008)
    after = st.ledger_totals(workers.database_url)
    assert after.usage_records == before.usage_records + 8
    assert_exact(workers.database_url, events + markers, settings)
    replays = sum(b["duplicates"] for b in worker.batches())
    assert replays == 10_000

    # Prometheus: counters count each request once; replays show as duplicates.
    samples = workers.metrics()
    assert sum(v for k, v in samples.items() if k.startswith("tokenmill_requests_total{")) == 10_008
    assert samples["tokenmill_streams_events_total{outcome=duplicate}"] == 10_000
    assert sum(v for k, v in samples.items() if k.startswith("tokenmill_tokens_total{")) == (
        after.input_tokens + after.output_tokens
    )
    ttft = [
        v for k, v in samples.items() if k.startswith("tokenmill_time_to_first_token_seconds_count")
    ]
    assert sum(ttft) == 10_008

    # SLA violations: every request that missed a target is published (at least once).
    missed = after.sla_records - after.sla_met
    assert missed > 0

    def violated() -> set[str]:
        recs = st.read_topic(workers.bootstrap, f"{workers.topic}.violations", quiet_s=0.3)
        return {json.loads(r.value)["request_id"] for r in recs}

    st.wait_until(lambda: len(violated()) >= missed, timeout_s=30, what="violations published")
    assert len(violated()) == missed


def test_sigkill_mid_stream_then_restart_is_exact(workers: Workers, settings: Settings) -> None:
    events = st.mixed_events(6_000, prefix="kill")
    workers.publish(events, spread=True)
    # Offsets are committed rarely and batches are small, so the first worker is killed
    # mid-stream and the restarted one must replay what it wrote after its last commit.
    first = workers.start(
        TOKENMILL_STREAMS__COMMIT_INTERVAL_S="30", TOKENMILL_STREAMS__BATCH_MAX="200"
    )
    st.wait_until(lambda: st.usage_count(workers.database_url) >= 1_000, timeout_s=90,
                  interval_s=0.05, what="1,000 records before the kill")  # fmt: skip
    first.kill()
    assert st.usage_count(workers.database_url) < 6_000, "too late to kill mid-stream"
    second = workers.start()
    workers.wait_recorded(6_000)
    assert_exact(workers.database_url, events, settings)
    assert sum(b["duplicates"] for b in second.batches()) > 0  # it did replay


# PostgreSQL: where copies share partitions in a deployment, and where concurrent
# writers really race (SQLite's writers queue; test_stream_copies kills a copy on it).
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_workers_sharing_partitions_are_exact(workers: Workers, settings: Settings) -> None:
    events = st.mixed_events(8_000, prefix="pair")
    workers.publish(events[:2_000], spread=True)
    one = workers.start(TOKENMILL_STREAMS__BATCH_MAX="200")
    st.wait_until(lambda: st.usage_count(workers.database_url) >= 200, timeout_s=90,
                  interval_s=0.1, what="the first worker running")  # fmt: skip
    two = workers.start(TOKENMILL_STREAMS__BATCH_MAX="200")  # joins: a rebalance mid-stream
    workers.wait_ready(two)
    workers.publish(events[2_000:6_000], spread=True)
    workers.wait_recorded(6_000)
    assert_exact(workers.database_url, events[:6_000], settings)
    assert one.log().count('"event": "partitions assigned"') >= 2  # it was rebalanced
    assert sum(b["recorded"] for b in one.batches()) > 0
    assert sum(b["recorded"] for b in two.batches()) > 0, "the second worker got no partition"
    # One leaves (drained, exit 0): the other takes all partitions from their commits.
    assert one.stop() == 0, one.log()[-3000:]
    workers.publish(events[6_000:], spread=True)
    workers.wait_recorded(8_000)
    assert_exact(workers.database_url, events, settings)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the database plays no part
def test_bad_events_are_dead_lettered_and_processing_continues(
    workers: Workers, settings: Settings
) -> None:
    good = st.mixed_events(300, prefix="good")
    unknown_model = st.finished_event("bad-model", model="no-such-model")
    no_times = st.finished_event("bad-times")
    del no_times["submitted_at"]
    bad = [
        (b"alpha", b"not json at all"),
        (b"alpha", json.dumps({**good[0], "request_id": "bad-neg", "prompt_tokens": -5}).encode()),
        (b"beta", json.dumps({**good[1], "request_id": "bad-kind", "kind": "exploded"}).encode()),
        (
            b"beta",
            json.dumps({**good[2], "request_id": "bad-major", "schema_version": "9.0"}).encode(),
        ),
        (b"gamma", st.encode(no_times)),
        (b"gamma", st.encode(unknown_model)),
    ]
    payloads = [(e["tenant"].encode(), st.encode(e)) for e in good[:150]] + bad
    payloads += [(e["tenant"].encode(), st.encode(e)) for e in good[150:]]
    st.publish(workers.bootstrap, workers.topic, payloads)
    workers.start()
    workers.wait_recorded(300)
    assert_exact(workers.database_url, good, settings)

    def dead() -> list:
        return st.read_topic(workers.bootstrap, f"{workers.topic}.dead", quiet_s=0.3)

    st.wait_until(lambda: len(dead()) >= len(bad), timeout_s=30, what="dead letters")
    letters = dead()
    assert len(letters) == len(bad)
    by_value = {rec.value: dict(rec.headers) for rec in letters}
    for key, value in bad:
        headers = by_value[value]
        assert headers["source-topic"] == workers.topic.encode()
        assert int(headers["source-offset"]) >= 0 and int(headers["source-partition"]) >= 0
    reasons = {json.loads(v)["request_id"] if v.startswith(b"{") else "junk": h["reason"].decode()
               for v, h in by_value.items()}  # fmt: skip
    assert "Invalid JSON" in reasons["junk"]
    assert "prompt_tokens" in reasons["bad-neg"]
    assert "kind" in reasons["bad-kind"]
    assert reasons["bad-major"].startswith("UnsupportedSchemaVersion")
    assert "lacks submitted_at" in reasons["bad-times"]
    assert "no price card for model 'no-such-model'" in reasons["bad-model"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the drain is the worker's; each database's restart: test_sigkill_*
def test_sigterm_drains_to_zero_lag_then_exits_0(workers: Workers, settings: Settings) -> None:
    # Small batches make the worker slow enough that SIGTERM finds most events unconsumed.
    worker = workers.start(TOKENMILL_STREAMS__BATCH_MAX="20")
    workers.wait_ready(worker)
    events = st.mixed_events(8_000, prefix="drain")
    workers.publish(events, spread=True)
    st.wait_until(lambda: st.usage_count(workers.database_url) >= 200, timeout_s=60,
                  interval_s=0.05, what="the worker consuming")  # fmt: skip
    worker.proc.send_signal(15)  # type: ignore[union-attr]
    assert st.usage_count(workers.database_url) < len(events), "too late to test the drain"
    assert worker.proc.wait(60) == 0, worker.log()[-3000:]  # type: ignore[union-attr]
    assert_exact(workers.database_url, events, settings)  # every event, once
    assert '"event": "drained' in worker.log()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # as above: test_sigkill_* restarts on each database
def test_drain_timeout_exits_non_zero_and_a_restart_is_exact(
    workers: Workers, settings: Settings
) -> None:
    events = st.mixed_events(6_000, prefix="slow")
    workers.publish(events, spread=True)
    first = workers.start(TOKENMILL_STREAMS__BATCH_MAX="10", TOKENMILL_STREAMS__DRAIN_TIMEOUT_S="1")
    st.wait_until(lambda: st.usage_count(workers.database_url) >= 100, timeout_s=60,
                  interval_s=0.05, what="the worker consuming")  # fmt: skip
    assert first.stop(timeout_s=30) == EXIT_DRAIN_TIMEOUT, first.log()[-3000:]
    workers.started.remove(first)  # its exit status is the one expected
    assert st.usage_count(workers.database_url) < len(events)
    assert "drain timed out" in first.log()
    second = workers.start()
    workers.wait_recorded(len(events))
    assert_exact(workers.database_url, events, settings)
    # It started from the committed offsets: at most the last uncommitted batch replays.
    assert sum(b["duplicates"] for b in second.batches()) <= 10
