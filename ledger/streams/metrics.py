"""Prometheus metrics of the stream processors.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` →
``tokenmill_time_to_first_token_seconds``, same buckets) and OpenTelemetry's ``gen_ai``
semantic conventions where they exist (``gen_ai.client.token.usage`` →
``gen_ai_client_token_usage``, with ``gen_ai_token_type`` = ``input``/``output`` and
``gen_ai_request_model``), plus ``tenant`` (and ``tier``) labels. Counters move only
for records new to the ledger, so replays do not inflate them; with several workers,
sum them across instances. The SLA gauges are read from the ledger over a sliding
window, so every worker exports the same values (take ``max``), and they survive
restarts. Percentiles over windows: ``histogram_quantile`` over the histograms, or
``tokenmill sla`` for exact ones from the ledger.

Fair-share gauges (:mod:`..fairness` defines each figure), from the ledger over the last
``fairness_window_s`` seconds, per ``tenant`` and ``priority`` (class), refreshed with the
SLA gauges; a tenant with no request finished in the window has none. No ``model``
label: the scheduler keeps one counter per tenant and class, across models.

* ``tokenmill_fair_share_requests``: requests finished in the window;
* ``tokenmill_fair_share_service_tokens``: weighted tokens charged, as the scheduler
  charges them (``w_req + w_in·input + w_out·output``);
* ``tokenmill_fair_share_received_ratio`` / ``tokenmill_fair_share_entitled_ratio``: the
  tenant's share of its class's service, and its weight's share among the class's
  active tenants;
* ``tokenmill_fairness_jain_index`` (``priority`` only): Jain's index of received over
  entitled shares;
* ``tokenmill_service_gap_seconds_max``: the longest time the tenant had a request
  waiting while none of its requests was dispatched;
* ``tokenmill_queue_wait_seconds`` (plus ``quantile`` = ``0.5``/``0.99``): exact from the
  ledger, unlike ``tokenmill_request_queue_time_seconds``;
* ``tokenmill_goodput_requests_per_second`` and ``tokenmill_goodput_ratio``: requests
  meeting every SLA target, per second of the window and as a share (attainment).

The figures are kept by one collector, updated once per batch on the processor's
thread (``prometheus_client``'s per-call locking and label lookups cost more than the
rest of the per-event work); the HTTP server's thread reads them.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import repeat
from operator import attrgetter, is_not, sub, truediv
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from ..fairness import Fairness
from ..sla import Attainment
from .rates import units_to_decimal
from .sink import BatchOutcome, Recorded

# Buckets as vLLM defines them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# OpenTelemetry's advisory buckets for gen_ai.client.token.usage.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

SLA_LABELS = ("tenant", "tier", "model")
FAIR_LABELS = ("tenant", "priority")

#: the fair-share gauges: name → (help, labels)
FAIRNESS_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tokenmill_fair_share_requests": ("Requests finished in the fairness window.", FAIR_LABELS),
    "tokenmill_fair_share_service_tokens": (
        "Weighted tokens charged in the window (w_req + w_in*input + w_out*output).", FAIR_LABELS),
    "tokenmill_fair_share_received_ratio": (
        "The tenant's share of its priority class's weighted service in the window.", FAIR_LABELS),
    "tokenmill_fair_share_entitled_ratio": (
        "The tenant's weight over the weights of the class's tenants active in the window.",
        FAIR_LABELS),
    "tokenmill_fairness_jain_index": (
        "Jain's index of received over entitled shares of a class's active tenants.",
        ("priority",)),
    "tokenmill_service_gap_seconds_max": (
        "Longest time the tenant had a request waiting while none of its requests was dispatched.",
        FAIR_LABELS),
    "tokenmill_queue_wait_seconds": (
        "Queue wait (submission to dispatch) quantiles over the window, exact from the ledger.",
        (*FAIR_LABELS, "quantile")),
    "tokenmill_goodput_requests_per_second": (
        "Requests that met every SLA target, per second of the fairness window.", FAIR_LABELS),
    "tokenmill_goodput_ratio": (
        "Share of the window's requests that met every SLA target (attainment).", FAIR_LABELS),
}  # fmt: skip


class _Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, key: tuple[str, ...], by: float = 1.0) -> None:
        self.values[key] += by

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            fam.add_metric(list(key), value)
        return fam


class _Histogram:
    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, buckets
        #: label values → [per-bucket counts (last: +Inf), sum]
        self.data: dict[tuple[str, ...], list[Any]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        entry = self.data.get(key)
        if entry is None:
            entry = self.data[key] = [[0] * (len(self.bounds) + 1), 0.0]
        entry[0][bisect_left(self.bounds, value)] += 1
        entry[1] += value

    def observe_many(self, key: tuple[str, ...], values: Sequence[float]) -> None:
        """Observe each of ``values``, as :meth:`observe` does one by one."""
        if not values:
            return
        entry = self.data.get(key)
        if entry is None:
            entry = self.data[key] = [[0] * (len(self.bounds) + 1), 0.0]
        counts = entry[0]
        total = sum(values)
        if math.isnan(total):  # a NaN (which sorts nowhere) among them: one by one
            for index, n in Counter(map(partial(bisect_left, self.bounds), values)).items():
                counts[index] += n
        else:
            # Sorted once in C, then one bisection per bucket bound, not one per value:
            # bucket i holds bounds[i-1] < v <= bounds[i], as bisect_left(bounds, v) says.
            ordered = sorted(values)
            below = 0
            for index, bound in enumerate(self.bounds):
                upto = bisect_right(ordered, bound, below)
                counts[index] += upto - below
                below = upto
            counts[-1] += len(ordered) - below
        entry[1] += total

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (counts, total) in list(self.data.items()):
            cumulative, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), list(counts)):
                running += n
                cumulative.append((_le(bound), running))
            fam.add_metric(list(key), cumulative, total)
        return fam


_EVENT = attrgetter("event")
_MEASUREMENT = attrgetter("measurement")
_PROMPT = attrgetter("prompt_tokens")
_COMPLETION = attrgetter("completion_tokens")
_FINISHED_AT = attrgetter("finished_at")
_KNOWN = partial(is_not, None)


def _seconds(ms: Iterable[float]) -> list[float]:
    """Milliseconds to seconds, each ``v / 1000.0`` (a C loop)."""
    return list(map(truediv, ms, repeat(1000.0)))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class StreamMetrics(Collector):
    """The metrics one stream-processor process exports.

    Parameters:
        registry: where to register (None: nowhere, e.g. in tests that call
            :meth:`collect` directly).
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        C, H = _Counter, _Histogram
        self.requests = C(
            "tokenmill_requests", "Finished requests recorded in the ledger.", SLA_LABELS
        )
        self.tokens = C("tokenmill_tokens", "Tokens of finished requests (type: input|output).",
                        ("tenant", "model", "type"))  # fmt: skip
        self.cost = C("tokenmill_cost", "Charged amount (approximate; the ledger is exact).",
                      ("tenant", "model", "currency"))  # fmt: skip
        self.sla_requests = C("tokenmill_sla_requests",
                              "Finished requests by whether they met every target of their SLA class.",
                              (*SLA_LABELS, "met"))  # fmt: skip
        self.violations = C("tokenmill_sla_violations", "Missed SLA targets (target: ttft|tpot|e2e).",
                            (*SLA_LABELS, "target"))  # fmt: skip
        self.events = C("tokenmill_streams_events",
                        "Token events processed (outcome: recorded|duplicate|skipped|dead_lettered).",
                        ("outcome",))  # fmt: skip
        self.token_usage = H("gen_ai_client_token_usage",
                             "Tokens per request (OpenTelemetry gen_ai.client.token.usage).",
                             ("gen_ai_token_type", "gen_ai_request_model", "tenant"), TOKEN_BUCKETS)  # fmt: skip
        self.ttft = H("tokenmill_time_to_first_token_seconds", "Time to first token, from submission.",
                      SLA_LABELS, TTFT_BUCKETS)  # fmt: skip
        self.tpot = H("tokenmill_time_per_output_token_seconds",
                      "(end-to-end - TTFT) / (output tokens - 1).", SLA_LABELS, TPOT_BUCKETS)  # fmt: skip
        self.e2e = H("tokenmill_e2e_request_latency_seconds", "Submission to finish.", SLA_LABELS,
                     LATENCY_BUCKETS)  # fmt: skip
        self.queue = H("tokenmill_request_queue_time_seconds", "Submission to dispatch.", SLA_LABELS,
                       LATENCY_BUCKETS)  # fmt: skip
        self.batch_seconds = H("tokenmill_streams_batch_duration_seconds",
                               "Time to record one batch, publishing included.", (), LAG_BUCKETS)  # fmt: skip
        self.lag = H("tokenmill_streams_ledger_lag_seconds", "From a request's finish to its ledger commit.",
                     (), LAG_BUCKETS)  # fmt: skip
        self.gauges: dict[str, tuple[str, tuple[str, ...], dict[tuple[str, ...], float]]] = {
            "tokenmill_sla_goodput_ratio": (
                "Share of a tenant's finished requests that met every target, over the window.",
                ("tenant",), {}),
            "tokenmill_sla_goodput_requests_per_second": (
                "A tenant's requests per second that met every target, over the window.",
                ("tenant",), {}),
            "tokenmill_sla_attainment_ratio": (
                "Share of a tenant's finished requests meeting one target, over the window.",
                ("tenant", "target"), {}),
        }  # fmt: skip
        #: the fair-share gauges' samples, replaced whole by :meth:`set_fairness` (so the
        #: HTTP thread reads one window's figures, and tenants gone from it disappear)
        self.fair: dict[str, dict[tuple[str, ...], float]] = {}
        if registry is not None:
            registry.register(self)

    def _all(self) -> Iterable[_Counter | _Histogram]:
        return (self.requests, self.tokens, self.cost, self.sla_requests, self.violations,
                self.events, self.token_usage, self.ttft, self.tpot, self.e2e, self.queue,
                self.batch_seconds, self.lag)  # fmt: skip

    def collect(self) -> Iterator[Any]:
        for metric in self._all():
            yield metric.family()
        for name, (doc, labels, values) in self.gauges.items():
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in list(values.items()):
                fam.add_metric(list(key), value)
            yield fam
        fair = self.fair
        for name, (doc, labels) in FAIRNESS_GAUGES.items():
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in fair.get(name, {}).items():
                fam.add_metric(list(key), value)
            yield fam

    def observe(self, outcome: BatchOutcome, *, dead_lettered: int, committed_at: float,
                seconds: float) -> None:  # fmt: skip
        """Count a written batch (only records new to the ledger move the counters)."""
        new = outcome.new
        self.events.inc(("recorded",), len(new))
        self.events.inc(("duplicate",), outcome.duplicates)
        self.events.inc(("skipped",), outcome.skipped)
        self.events.inc(("dead_lettered",), dead_lettered)
        self.batch_seconds.observe((), seconds)
        # Grouped by label values first: per-record calls cost more than the rest of the
        # per-event work of a batch.
        groups: dict[tuple[str, str, str], list[Recorded]] = {}
        for rec in new:
            ev = rec.event
            groups.setdefault((ev.tenant, rec.tier or "unknown", ev.model), []).append(rec)
        cost: dict[tuple[str, str, str], Any] = {}
        units: dict[tuple[str, str, str], int] = {}
        finishes: list[Any] = []
        # Columns by map() and attrgetter (C loops), not comprehensions (a Python step
        # per value): about half the cost.
        for sla, recs in groups.items():
            tenant, tier, model = sla
            events = list(map(_EVENT, recs))
            queue_ms, ttft_ms, tpot_ms, e2e_ms, missed_of = zip(*map(_MEASUREMENT, recs))
            inputs = list(map(_PROMPT, events))
            outputs = list(map(_COMPLETION, events))
            self.requests.inc(sla, len(recs))
            self.tokens.inc((tenant, model, "input"), sum(inputs))
            self.tokens.inc((tenant, model, "output"), sum(outputs))
            self.token_usage.observe_many(("input", model, tenant), inputs)
            self.token_usage.observe_many(("output", model, tenant), outputs)
            for r in recs:  # whole ledger units where priced so: no Decimal per event
                key = (tenant, model, r.currency)
                if r.units is None:
                    cost[key] = cost.get(key, 0) + r.cost
                else:
                    units[key] = units.get(key, 0) + r.units
            self.e2e.observe_many(sla, _seconds(e2e_ms))
            self.ttft.observe_many(sla, _seconds(filter(_KNOWN, ttft_ms)))
            self.tpot.observe_many(sla, _seconds(filter(_KNOWN, tpot_ms)))
            self.queue.observe_many(sla, _seconds(filter(_KNOWN, queue_ms)))
            judged = (missed_of if tier != "unknown"  # else some may have no tier: not judged
                      else [r.measurement.missed for r in recs if r.tier is not None])  # fmt: skip
            missed = list(filter(None, judged))
            if len(judged) > len(missed):
                self.sla_requests.inc((*sla, "true"), len(judged) - len(missed))
            if missed:
                self.sla_requests.inc((*sla, "false"), len(missed))
                for targets in missed:
                    for target in targets:
                        self.violations.inc((*sla, target))
            finishes += map(_FINISHED_AT, events)  # every recorded event has one
        lags = list(map(sub, repeat(committed_at), finishes))
        if lags and min(lags) < 0.0:  # a clock ahead of this one
            lags = [max(0.0, lag) for lag in lags]
        self.lag.observe_many((), lags)
        for key, n in units.items():
            cost[key] = cost.get(key, 0) + units_to_decimal(n)
        for key, amount in cost.items():
            self.cost.inc(key, float(amount))

    def set_window(self, rows: Iterable[Attainment], window_s: float) -> None:
        """Set the SLA gauges from per-tenant counts over the last ``window_s`` seconds."""
        ratio = self.gauges["tokenmill_sla_goodput_ratio"][2]
        rate = self.gauges["tokenmill_sla_goodput_requests_per_second"][2]
        attainment = self.gauges["tokenmill_sla_attainment_ratio"][2]
        for row in rows:
            if row.requests == 0:
                continue
            ratio[(row.tenant,)] = row.met / row.requests
            rate[(row.tenant,)] = row.met / window_s
            for target, ok in row.target_met.items():
                attainment[(row.tenant, target)] = ok / row.requests

    def set_fairness(self, figures: Fairness) -> None:
        """Set the fair-share gauges from one window's figures (all at once)."""
        fair: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in FAIRNESS_GAUGES}
        for t in figures.tenants:
            key = (t.tenant, t.priority)
            fair["tokenmill_fair_share_requests"][key] = t.requests
            fair["tokenmill_fair_share_service_tokens"][key] = t.service
            fair["tokenmill_fair_share_received_ratio"][key] = t.received_share
            fair["tokenmill_fair_share_entitled_ratio"][key] = t.entitled_share
            fair["tokenmill_service_gap_seconds_max"][key] = t.largest_gap_s
            for q, value in (("0.5", t.queue_p50_s), ("0.99", t.queue_p99_s)):
                if value is not None:
                    fair["tokenmill_queue_wait_seconds"][(*key, q)] = value
            fair["tokenmill_goodput_requests_per_second"][key] = t.goodput_rps
            fair["tokenmill_goodput_ratio"][key] = t.attainment
        for prio, jain in figures.jain.items():
            fair["tokenmill_fairness_jain_index"][(prio,)] = jain
        self.fair = fair


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY,
          port_file: Path | None = None) -> int:  # fmt: skip
    """Serve ``/metrics`` over HTTP in a daemon thread; port 0 picks a free one.

    Returns:
        The port; also written to ``port_file`` (atomically) if given.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    actual = int(server.server_port)
    if port_file is not None:
        port_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(actual))
        tmp.replace(port_file)
    _servers.append(server)
    return actual


_servers: list[object] = []  # keep the servers referenced for the process's lifetime
