"""The stream processors' parts without a broker: decoding, SLA measurement, the ledger
sink (SQLite and PostgreSQL), the batch processor, metrics, and reconciliation with the
scheduler's budget accounting."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import streams_helpers as st
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as hs
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import PriceCard, Settings
from tokenmill.ledger import (
    Card,
    make_engine,
    migrate,
    session_factory,
    sync_price_cards,
    transaction,
)
from tokenmill.ledger.models import LedgerEntry, SlaRecord, UsageMinute, UsageRecord
from tokenmill.ledger.streams import (
    BatchProcessor,
    LedgerSink,
    LedgerUnavailable,
    Record,
    Rejected,
    StreamMetrics,
    StreamsConfig,
    measure,
    parse,
)
from tokenmill.ledger.streams.metrics import LATENCY_BUCKETS, _Histogram

from tokenmill.pricing import PriceBook
from tokenmill.wire import EventKind, Priority, TokenEvent

T_FINISH = datetime(2026, 11, 3, 12, 0, 30, tzinfo=UTC).timestamp()


def ev(rid: str = "r1", **kw: Any) -> TokenEvent:
    fields = st.finished_event(rid, finished_at=kw.pop("finished_at", T_FINISH), **kw)
    return TokenEvent.model_validate(fields)


# -- decoding --------------------------------------------------------------------------


def test_parse_accepts_events_and_names_what_is_wrong() -> None:
    good = st.encode(st.finished_event("r1"))
    assert isinstance(parse(good), TokenEvent)
    progress = json.dumps({"kind": "progress", "request_id": "r", "tenant": "a", "model": "m"})
    assert parse(progress.encode()).kind is EventKind.progress  # type: ignore[union-attr]
    cases = {
        b"": "empty message",
        b"{nope": "Invalid JSON",
        json.dumps({**json.loads(good), "completion_tokens": -1}).encode(): "completion_tokens",
        json.dumps(
            {**json.loads(good), "schema_version": "2.0"}
        ).encode(): "UnsupportedSchemaVersion",
        json.dumps({**json.loads(good), "finished_at": None}).encode(): "lacks finished_at",
    }
    for raw, words in cases.items():
        got = parse(raw)
        assert isinstance(got, Rejected) and words in got.reason, (raw, got)


# -- SLA measurement ---------------------------------------------------------------------


def test_measure_follows_the_definitions(settings: Settings) -> None:
    gold = settings.sla["gold"]  # ttft 1000, tpot 100, e2e 30000 ms
    e = ev(completion_tokens=11, queue_s=0.05, ttft_s=0.5, tpot_s=0.02)
    m = measure(e, gold)
    assert m.queue_ms == pytest.approx(50)
    assert m.ttft_ms == pytest.approx(500)
    assert m.e2e_ms == pytest.approx(500 + 10 * 20)
    assert m.tpot_ms == pytest.approx((m.e2e_ms - m.ttft_ms) / 10)
    assert m.met and m.missed == ()
    one = measure(ev(completion_tokens=1, ttft_s=0.2), gold)
    assert one.tpot_ms is None and one.met  # TPOT undefined for one output token
    slow = measure(ev(completion_tokens=3, ttft_s=2.0, tpot_s=0.5), gold)
    assert slow.missed == ("ttft", "tpot")
    assert measure(ev(ttft_s=99), None).met  # no SLA class: nothing to miss
    no_first = ev(completion_tokens=0).model_copy(update={"first_token_at": None})
    assert measure(no_first, gold).ttft_ms is None
    # a batch line waits behind interactive work by design: its SLA is its batch's window
    late = ev(completion_tokens=3, ttft_s=2.0, tpot_s=0.5)
    for priority, missed in ((Priority.interactive, ("ttft", "tpot")), (Priority.batch, ())):
        got = measure(late.model_copy(update={"priority": priority}), gold)
        assert got.missed == missed and got.ttft_ms == pytest.approx(2000)


# -- the ledger sink ------------------------------------------------------------------------


def _rows(sessions: sessionmaker[Session], model: Any) -> int:
    with transaction(sessions) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def test_sink_prices_with_the_card_in_force_and_replays_are_no_ops(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as s:  # sim costs twice as much from November 3rd, noon
        sync_price_cards(s, [PriceCard(model="sim", effective_from=datetime(2026, 11, 3, 12, tzinfo=UTC),
                                       input_per_million="0.20", output_per_million="0.80",
                                       batch_discount="0.5")])  # fmt: skip
    sink.prepare()
    before_change = T_FINISH - 3600
    events = [
        ev("old", prompt_tokens=1000, completion_tokens=500, finished_at=before_change),
        ev("new", prompt_tokens=1000, completion_tokens=500),
        ev("new-batch", prompt_tokens=1000, completion_tokens=500, priority="batch"),
        ev("progress").model_copy(update={"kind": EventKind.progress}),
    ]
    out = sink.write(events)
    assert [r.event.request_id for r in out.new] == ["old", "new", "new-batch"]
    assert out.skipped == 1 and not out.rejected
    with transaction(sessions) as s:
        amounts = dict(s.execute(select(LedgerEntry.request_id, LedgerEntry.amount)).all())
    assert amounts == {
        "old": Decimal("0.0003"),  # 1000 * 0.10/M + 500 * 0.40/M
        "new": Decimal("0.0006"),
        "new-batch": Decimal("0.0003"),  # half price
    }
    again = sink.write(events)
    assert again.duplicates == 3 and not again.new
    assert (
        _rows(sessions, UsageRecord),
        _rows(sessions, LedgerEntry),
        _rows(sessions, SlaRecord),
    ) == (3, 3, 3)
    with transaction(sessions) as s:
        assert s.execute(select(func.sum(UsageMinute.requests))).scalar_one() == 3


def test_sink_rejects_what_it_cannot_price_and_keeps_the_rest(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    out = sink.write(
        [
            ev("a"),
            ev("b", model="unpriced"),
            ev("a", completion_tokens=7),
            ev("c", tenant="stranger"),
        ]
    )
    assert [(i, r.split(":")[0]) for i, r in out.rejected] == [(1, "NotFound")]
    assert [(r.event.request_id, r.new) for r in out.recorded] == [
        ("a", True),
        ("a", False),
        ("c", True),
    ]
    # An unknown tenant is billed (money is never dropped) but has no SLA class.
    assert (_rows(sessions, UsageRecord), _rows(sessions, SlaRecord)) == (2, 1)


def test_sink_picks_the_card_in_force_to_the_microsecond(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    start = datetime(2026, 11, 3, 12, 0, 0, 123457, tzinfo=UTC)
    with transaction(sessions) as s:
        sync_price_cards(s, [PriceCard(model="sim", effective_from=start, input_per_million="0.20",
                                       output_per_million="0.80", batch_discount="0.5")])  # fmt: skip
    sink.prepare()
    t = start.timestamp()
    deltas = (-1e-6, 0.0, 1e-6)
    out = sink.write([ev(f"r{i}", prompt_tokens=10**6, completion_tokens=0, finished_at=t + d)
                      for i, d in enumerate(deltas)])  # fmt: skip
    with transaction(sessions) as s:
        amounts = dict(s.execute(select(LedgerEntry.request_id, LedgerEntry.amount)).all())
    # 0.10 before the new card's microsecond, 0.20 from it on
    assert [amounts[f"r{i}"] for i in range(3)] == [Decimal("0.1"), Decimal("0.2"), Decimal("0.2")]
    assert [r.card_id for r in out.new] == [
        sink.price_book.in_force("sim", datetime.fromtimestamp(t + d, UTC)).id  # type: ignore[union-attr]
        for d in deltas
    ]


def test_sink_dead_letters_a_finish_that_is_not_a_time(sink: LedgerSink) -> None:
    out = sink.write([ev("a"), ev("inf", finished_at=float("inf")), ev("nan", finished_at=float("nan")),
                      ev("far", finished_at=1e300), ev("b")])  # fmt: skip
    assert [(i, r.split(":")[0]) for i, r in out.rejected] == [(1, "ValueError"), (2, "ValueError"),
                                                              (3, "ValueError")]  # fmt: skip
    assert [r.event.request_id for r in out.new] == ["a", "b"]


def test_sink_reports_an_unreachable_database_as_retryable(
    settings: Settings, tmp_path: Any
) -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none")
    sink = LedgerSink(session_factory(engine), settings)
    sink._book = PriceBook([st_card()])
    with pytest.raises(LedgerUnavailable):
        sink.write([ev()])


def st_card() -> Card:
    return Card(1, "sim", datetime(2026, 1, 1, tzinfo=UTC), "USD", Decimal("0.1"),
                Decimal("0.4"), Decimal("0.5"))  # fmt: skip


@hsettings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spec=hs.lists(hs.tuples(hs.integers(0, 30), hs.integers(0, 5000), hs.integers(0, 900),
                            hs.sampled_from(["standard", "batch"])), min_size=1, max_size=40),
    data=hs.data(),
)  # fmt: skip
def test_any_redelivery_pattern_gives_the_same_ledger(
    spec: list, data: Any, settings: Settings
) -> None:
    """Events delivered in any order, any number of times, in any batches: the ledger
    holds each request once and the totals of the first delivery of each."""
    events = [
        ev(f"q{n}", prompt_tokens=p, completion_tokens=c, priority=prio) for n, p, c, prio in spec
    ]
    first: dict[str, TokenEvent] = {}
    deliveries = data.draw(hs.lists(hs.sampled_from(events), max_size=60)) + events
    for e in deliveries:
        first.setdefault(e.request_id, e)
    cuts = sorted(data.draw(hs.lists(hs.integers(0, len(deliveries)), max_size=6)))
    engine = make_engine("sqlite://")
    migrate(engine)
    sink = LedgerSink(session_factory(engine), settings)
    sink.prepare()
    for lo, hi in zip([0, *cuts], [*cuts, len(deliveries)]):
        sink.write(deliveries[lo:hi])
    totals = _totals(session_factory(engine))
    cost = sum((st_card_cost(e) for e in first.values()), Decimal(0))
    assert totals == (len(first), sum(e.prompt_tokens for e in first.values()),
                      sum(e.completion_tokens for e in first.values()), cost)  # fmt: skip
    engine.dispose()


def st_card_cost(e: TokenEvent) -> Decimal:
    c = (Decimal("0.10") * e.prompt_tokens + Decimal("0.40") * e.completion_tokens) / 1_000_000
    return c / 2 if e.priority.value == "batch" else c


def _totals(sessions: sessionmaker[Session]) -> tuple[int, int, int, Decimal]:
    with transaction(sessions) as s:
        n, i, o = s.execute(select(func.sum(UsageMinute.requests), func.sum(UsageMinute.input_tokens),
                                   func.sum(UsageMinute.output_tokens))).one()  # fmt: skip
        amount = sum(s.execute(select(LedgerEntry.amount)).scalars(), Decimal(0))
    return int(n), int(i), int(o), amount


# -- the batch processor -------------------------------------------------------------------


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   headers: list[tuple[str, bytes]]) -> Awaitable[Any]:  # fmt: skip
        self.sent.append((topic, key, value, dict(headers)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def records(*values: bytes) -> list[Record]:
    return [Record("tokens", i % 2, 100 + i, b"alpha", v) for i, v in enumerate(values)]


async def test_processor_dead_letters_publishes_violations_and_counts_new_records(
    sink: LedgerSink,
) -> None:
    pub, registry = FakePublisher(), CollectorRegistry()
    metrics = StreamMetrics(registry)
    proc = BatchProcessor(sink, StreamsConfig(), pub, metrics)
    batch = records(
        st.encode(st.finished_event("ok", completion_tokens=10)),
        b"garbage",
        st.encode(st.finished_event("slow", ttft_s=5.0, completion_tokens=2)),  # gold TTFT is 1 s
    )
    report = await proc.process(batch)
    assert (report.recorded, report.dead_lettered, report.violations) == (2, 1, 1)
    (dead,), (viol,) = (
        [s for s in pub.sent if s[0] == t]
        for t in ("tokenmill.dead-letter", "tokenmill.sla-violations")
    )
    assert (
        dead[2] == b"garbage"
        and dead[3]["source-offset"] == b"101"
        and dead[3]["source-partition"] == b"1"
    )
    assert b"Invalid JSON" in dead[3]["reason"] and dead[3]["source-topic"] == b"tokens"
    v = json.loads(viol[2])
    assert (v["request_id"], v["missed"], v["tier"], v["targets"]["ttft_ms"]) == (
        "slow",
        ["ttft"],
        "gold",
        1000.0,
    )
    again = await proc.process(batch)  # a replay: nothing new, violations again (at-least-once)
    assert (again.recorded, again.duplicates, again.violations) == (0, 2, 1)
    text = generate_latest(registry).decode()
    assert 'tokenmill_requests_total{model="sim",tenant="alpha",tier="gold"} 2.0' in text
    assert 'tokenmill_streams_events_total{outcome="duplicate"} 2.0' in text
    assert (
        'tokenmill_time_to_first_token_seconds_bucket{le="+Inf",model="sim",tenant="alpha",tier="gold"} 2.0'
        in text
    )
    assert (
        'gen_ai_client_token_usage_count{gen_ai_request_model="sim",gen_ai_token_type="output",tenant="alpha"} 2.0'
        in text
    )
    assert (
        'tokenmill_sla_violations_total{model="sim",target="ttft",tenant="alpha",tier="gold"} 1.0'
        in text
    )


async def test_processor_retries_an_unreachable_database(sink: LedgerSink) -> None:
    calls = []
    real = sink.commit

    def flaky(events: Any) -> Any:
        calls.append(1)
        if len(calls) < 3:
            raise LedgerUnavailable("down")
        return real(events)

    sink.commit = flaky  # type: ignore[method-assign]
    proc = BatchProcessor(sink, StreamsConfig(), FakePublisher(), backoff_s=0.01)
    report = await proc.process(records(st.encode(st.finished_event("r"))))
    assert len(calls) == 3 and report.recorded == 1


def test_sla_gauges_come_from_the_ledger_window(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    from tokenmill.ledger.sla import sla_attainment

    now = time.time()
    sink.write([ev("fast", finished_at=now), ev("slow", finished_at=now, ttft_s=3.0),
                ev("old", finished_at=now - 3600, ttft_s=3.0)])  # fmt: skip
    with transaction(sessions) as s:
        rows = sla_attainment(s, datetime.now(UTC) - timedelta(minutes=5), sink.settings.sla)
    registry = CollectorRegistry()
    metrics = StreamMetrics(registry)
    metrics.set_window(rows, 300)
    text = generate_latest(registry).decode()
    assert 'tokenmill_sla_goodput_ratio{tenant="alpha"} 0.5' in text
    assert 'tokenmill_sla_attainment_ratio{target="ttft",tenant="alpha"} 0.5' in text
    assert 'tokenmill_sla_attainment_ratio{target="e2e",tenant="alpha"} 1.0' in text


def test_fairness_gauges_read_the_window_and_drop_tenants_gone_from_it(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    from tokenmill.ledger.streams.app import window_fairness

    now = time.time()
    sink.write([ev("a", finished_at=now), ev("b", tenant="beta", finished_at=now),
                ev("old", tenant="gamma", finished_at=now - 3600)])  # fmt: skip
    registry = CollectorRegistry()
    metrics = StreamMetrics(registry)
    metrics.set_fairness(window_fairness(sink, 300))
    text = generate_latest(registry).decode()
    # alpha (gold, 4) and beta (silver, 2) active in standard: gamma's request is too old
    assert 'tokenmill_fair_share_entitled_ratio{priority="standard",tenant="beta"} 0.333' in text
    assert 'tokenmill_fair_share_received_ratio{priority="standard",tenant="alpha"} 0.5' in text
    assert 'tenant="gamma"' not in text
    assert 'tokenmill_fairness_jain_index{priority="standard"} 0.9' in text  # x = 0.75, 1.5
    metrics.set_fairness(window_fairness(sink, 0.001))  # nothing finished that recently
    text = generate_latest(registry).decode()
    assert 'tenant="alpha"' not in text and "# TYPE tokenmill_fairness_jain_index gauge" in text


# -- one cost function: the scheduler's budget settles at the ledger's charge -----------------


@pytest.mark.parametrize("priority", ["standard", "batch"])
def test_scheduler_budget_settles_at_the_ledger_charge(
    sink: LedgerSink, sessions: sessionmaker[Session], settings: Settings, priority: str
) -> None:
    from tokenmill.scheduler import Pool, Priority, QueuedRequest
    from tokenmill.scheduler.service import build_policy

    policy = build_policy(settings)
    now = time.time()
    policy.enqueue(QueuedRequest("rec-1", "alpha", "sim", Priority(priority), 1234, 800, now), now)
    assert [
        d.request.request_id
        for d in policy.dispatch(Pool("p", frozenset({"sim"}), 4), now).dispatched
    ] == ["rec-1"]
    settled = policy.complete("rec-1", 1234, 567, now)
    assert settled is not None and settled.cost is not None
    sink.write(
        [ev("rec-1", prompt_tokens=1234, completion_tokens=567, priority=priority, finished_at=now)]
    )
    with transaction(sessions) as s:
        charged = s.execute(
            select(LedgerEntry.amount).where(LedgerEntry.request_id == "rec-1")
        ).scalar_one()
    assert charged == settled.cost
    assert policy.budget("alpha", now).spent == charged  # type: ignore[union-attr]


def test_scheduler_prices_a_settle_at_finished_at_as_the_ledger_does(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A price card that starts between a request's finish and its settle must not make
    the scheduler's budget and the ledger disagree."""
    from tokenmill.scheduler import Pool, Priority, QueuedRequest
    from tokenmill.scheduler.service import PricingClock, build_policy, settle

    now = time.time()
    dearer = PriceCard(model="sim", effective_from=datetime.fromtimestamp(now - 60, UTC),
                       input_per_million="0.30", output_per_million="1.20", batch_discount="0.5")
    settings = Settings(home=settings.home, price_cards=[*settings.price_cards, dearer])
    clock = PricingClock()
    policy = build_policy(settings, clock)
    policy.enqueue(QueuedRequest("card-1", "alpha", "sim", Priority("standard"), 1000, 800, now), now)
    policy.dispatch(Pool("p", frozenset({"sim"}), 4), now)
    finished = ev("card-1", prompt_tokens=1000, completion_tokens=500, finished_at=now - 120)
    settle(policy, clock, finished, now)
    sink = LedgerSink(sessions, settings)
    sink.prepare()
    sink.write([finished])
    with transaction(sessions) as s:
        charged = s.execute(
            select(LedgerEntry.amount).where(LedgerEntry.request_id == "card-1")
        ).scalar_one()
    assert charged == Decimal("0.0003")  # the card in force at finish, not the dearer one
    assert policy.budget("alpha", now).spent == charged  # type: ignore[union-attr]


@given(values=hs.lists(hs.one_of(hs.floats(), hs.sampled_from(LATENCY_BUCKETS),
                                 hs.integers(-10, 10**7)), max_size=60))  # fmt: skip
def test_histogram_batches_bucket_as_one_by_one(values: list[float]) -> None:
    one, many = (_Histogram("h", "doc", (), LATENCY_BUCKETS) for _ in range(2))
    for v in values:
        one.observe((), v)
    many.observe_many((), values)
    assert one.data.get((), [None])[0] == many.data.get((), [None])[0]


#: a finished event's fields, each sometimes replaced by a value of another shape
_FIELD_VALUES = hs.one_of(hs.none(), hs.booleans(), hs.integers(-2, 2**64), hs.floats(),
                          hs.text(max_size=5),
                          hs.sampled_from(["finished", "progress", "2.0", "1.9", "batch"]))  # fmt: skip


@hsettings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=hs.dictionaries(hs.sampled_from(sorted(st.finished_event("r"))), _FIELD_VALUES,
                               max_size=4),
       dropped=hs.sets(hs.sampled_from(sorted(st.finished_event("r"))), max_size=3),
       raw_tail=hs.sampled_from([b"", b" ", b"x", b"}"]))  # fmt: skip
def test_processor_decodes_exactly_as_parse(sink: LedgerSink, changes: dict[str, Any],
                                            dropped: set[str], raw_tail: bytes) -> None:  # fmt: skip
    fields = {k: v for k, v in {**st.finished_event("r"), **changes}.items() if k not in dropped}
    raws = [json.dumps(fields).encode() + raw_tail, b"", None]
    records = [Record("t", 0, i, None, raw) for i, raw in enumerate(raws)]
    prepared = BatchProcessor(sink, StreamsConfig(), None, None).prepare(records)  # type: ignore[arg-type]
    expected = [parse(raw) for raw in raws]
    assert prepared.rejects == [(i, p.reason) for i, p in enumerate(expected) if isinstance(p, Rejected)]
    assert prepared.where == [i for i, p in enumerate(expected) if not isinstance(p, Rejected)]
    for j, rec in prepared.plan.planned:  # ts, when absent, defaults to the time of decoding
        want = expected[prepared.where[j]]
        assert isinstance(want, TokenEvent)
        assert rec.event.model_dump(exclude={"ts"}) == want.model_dump(exclude={"ts"})
