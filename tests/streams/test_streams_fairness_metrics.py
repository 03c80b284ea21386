"""Real broker, a real ``tokenmill streams`` worker, SQLite and PostgreSQL: the fair-share
gauges it exports equal the figures computed here, offline, from the ledger's rows with
code of the test's own (the definitions of tokenmill/ledger/fairness.py read literally)."""

from __future__ import annotations

import random
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import streams_helpers as st
from sqlalchemy import text
from streams_helpers import Workers
from tokenmill.config import Settings
from tokenmill.ledger import make_engine, session_factory, transaction

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WINDOW_S = 3600.0


def timed(rid: str, tenant: str, prio: str, submitted: float, dispatched: float,
          finished: float, rng: random.Random) -> dict[str, Any]:  # fmt: skip
    e = st.finished_event(rid, tenant=tenant, priority=prio, finished_at=finished,
                          prompt_tokens=rng.randint(0, 900), completion_tokens=rng.randint(1, 300))  # fmt: skip
    first = dispatched + rng.uniform(0.01, 2.0)
    e.update(submitted_at=submitted, dispatched_at=dispatched, first_token_at=min(first, finished))
    return e


def workload(now: float) -> list[dict[str, Any]]:
    """Three tenants in two classes; gamma's interactive requests wait long (a gap), and a
    few requests are slow enough to miss their SLA."""
    rng = random.Random(5)
    base = now - 300
    events = []
    for i in range(40):
        tenant = ("alpha", "beta")[i % 2]
        prio = ("interactive", "batch")[i % 3 == 0]
        submitted = base + i * 2 + rng.uniform(0, 1)
        dispatched = submitted + rng.uniform(0, 3)
        finished = dispatched + rng.uniform(0.5, 40 if i % 7 == 0 else 4)
        events.append(timed(f"fair-{i}", tenant, prio, submitted, dispatched, finished, rng))
    for i, (s, d) in enumerate([(base, base + 30), (base + 5, base + 12), (base + 40, base + 41)]):
        events.append(timed(f"starved-{i}", "gamma", "interactive", s, d, d + 1.0, rng))
    return events


def ledger_rows(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as s:
            result = s.execute(text(
                "SELECT s.tenant, u.priority, s.finished_at, s.e2e_ms, s.queue_ms, s.ttft_ms,"
                " s.tpot_ms, s.met, u.prompt_tokens, u.completion_tokens"
                " FROM sla_records s JOIN usage_records u ON u.request_id = s.request_id"
            ))  # fmt: skip
            rows = [dict(r._mapping) for r in result]
    finally:
        engine.dispose()
    for r in rows:  # SQLite hands back text
        at = r["finished_at"]
        if isinstance(at, str):
            at = datetime.fromisoformat(at).replace(tzinfo=UTC)
        r["end"] = at.timestamp()
    return rows


def p(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (statistics' inclusive method)."""
    if len(values) == 1:
        return values[0]
    if q == 0.5:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def gap(waits: list[tuple[float, float]]) -> float:
    """Sweep: from the moment one request waits, each dispatch ends a piece."""
    points = sorted([(s, 0) for s, _ in waits] + [(d, 1) for _, d in waits])
    waiting, cut, longest = 0, 0.0, 0.0
    for t, kind in points:
        if kind == 0:
            if waiting == 0:
                cut = t
            waiting += 1
        else:
            longest = max(longest, t - cut)
            cut = t
            waiting -= 1
    return longest


def offline(rows: list[dict[str, Any]], settings: Settings) -> dict[str, float]:
    """The gauges' samples (as ``Workers.metrics`` names them), computed from ``rows``."""
    w_in, w_out = settings.scheduler.w_in, settings.scheduler.w_out
    out: dict[str, float] = {}
    for prio in {r["priority"] for r in rows}:
        mine = [r for r in rows if r["priority"] == prio]
        tenants = sorted({r["tenant"] for r in mine})
        service = {t: sum(1 + w_in * r["prompt_tokens"] + w_out * r["completion_tokens"]
                          for r in mine if r["tenant"] == t) for t in tenants}  # fmt: skip
        weight = {t: settings.tenant_weight(t) for t in tenants}
        xs = []
        for t in tenants:
            rs = [r for r in mine if r["tenant"] == t]
            lab = f"priority={prio},tenant={t}"
            received = service[t] / sum(service.values())
            entitled = weight[t] / sum(weight.values())
            xs.append(received / entitled)
            met = sum(1 for r in rs if r["met"])
            waits = [(r["end"] - r["e2e_ms"] / 1000, r["end"] - r["e2e_ms"] / 1000 + r["queue_ms"] / 1000)
                     for r in rs]  # fmt: skip
            queue = sorted(r["queue_ms"] / 1000 for r in rs)
            out |= {
                f"tokenmill_fair_share_requests{{{lab}}}": len(rs),
                f"tokenmill_fair_share_service_tokens{{{lab}}}": service[t],
                f"tokenmill_fair_share_received_ratio{{{lab}}}": received,
                f"tokenmill_fair_share_entitled_ratio{{{lab}}}": entitled,
                f"tokenmill_service_gap_seconds_max{{{lab}}}": gap(waits),
                f"tokenmill_queue_wait_seconds{{{lab.replace(',t', ',quantile=0.5,t')}}}": p(queue, 0.5),
                f"tokenmill_queue_wait_seconds{{{lab.replace(',t', ',quantile=0.99,t')}}}": p(queue, 0.99),
                f"tokenmill_goodput_requests_per_second{{{lab}}}": met / WINDOW_S,
                f"tokenmill_goodput_ratio{{{lab}}}": met / len(rs),
            }  # fmt: skip
        out[f"tokenmill_fairness_jain_index{{priority={prio}}}"] = sum(xs) ** 2 / (
            len(xs) * sum(x * x for x in xs)
        )
    return out


FAIR_PREFIXES = ("tokenmill_fair", "tokenmill_service_gap", "tokenmill_queue_wait_seconds",
                 "tokenmill_goodput_")  # fmt: skip


def test_fairness_gauges_equal_the_figures_computed_offline_from_the_ledger(
    workers: Workers, settings: Settings
) -> None:
    events = workload(time.time())
    workers.publish(events)
    workers.start(TOKENMILL_STREAMS__GAUGE_INTERVAL_S="0.2",
                  TOKENMILL_STREAMS__FAIRNESS_WINDOW_S=str(WINDOW_S))  # fmt: skip
    workers.wait_recorded(len(events))

    def scraped() -> dict[str, float]:
        return {k: v for k, v in workers.metrics().items() if k.startswith(FAIR_PREFIXES)}

    def complete() -> bool:
        counts = [v for k, v in scraped().items() if k.startswith("tokenmill_fair_share_requests{")]
        return sum(counts) == len(events)

    st.wait_until(complete, timeout_s=30, what="the fairness gauges refreshed")
    rows = ledger_rows(workers.database_url)
    assert len(rows) == len(events)
    expected = offline(rows, settings)
    got = scraped()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
    # as the workload was made: gamma waited from its dispatch at 12 s to the next at 30 s
    gamma = got["tokenmill_service_gap_seconds_max{priority=interactive,tenant=gamma}"]
    assert gamma == pytest.approx(18.0, abs=1e-3)
    assert 1 / 3 < got["tokenmill_fairness_jain_index{priority=interactive}"] < 1
