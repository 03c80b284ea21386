"""Run one stream-processor process (``tokenmill streams``)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis
from redis.exceptions import RedisError
from tokenmill.config import Settings

from tokenmill import kafka, loops, runtime
from tokenmill.logs import configure, get_logger
from tokenmill.stack import Endpoints

from .. import reconcile  # a module: it imports this package's sink (a cycle)
from ..billing import Period
from ..db import make_engine, migrate, session_factory
from .app import serve
from .config import StreamsConfig
from .metrics import StreamMetrics
from .metrics import serve as serve_metrics
from .sink import LedgerSink

log = get_logger(__name__)


#: how far back the start-up repair looks: this billing month and the previous one
_REPAIR_MONTHS = 2


def repair_on_start(sink: LedgerSink, endpoints: Endpoints) -> None:
    """Bill, exactly once, the work done whose token events never reached the ledger
    (lost with a broker, or with a processor killed mid-batch): :func:`~tokenmill.ledger.reconcile.repair`
    over the last :data:`_REPAIR_MONTHS` billing months, from the result store's stored
    terminal events (the very events the stream would have brought: same keys, same
    rows) and the batch lines' ledger rows. Safe beside running copies (the ledger's
    unique keys decide who bills). A result store that cannot be read leaves the
    ledger's own facts; a failure is logged, never keeps the processor from starting."""
    now = datetime.now(UTC)
    year, month = now.year, now.month - (_REPAIR_MONTHS - 1)
    while month < 1:
        year, month = year - 1, month + 12
    span = Period(Period.month(year, month).start, now + timedelta(days=1))
    results = None
    if endpoints.redis_url:
        results = redis.Redis.from_url(endpoints.redis_url, socket_timeout=60.0,
                                       socket_connect_timeout=5.0)  # fmt: skip
    try:
        try:
            report, done = reconcile.repair(sink, results=results, period=span)
        except RedisError as exc:
            log.warning("start-up repair: result store unreadable; ledger facts only", error=str(exc))
            report, done = reconcile.repair(sink, period=span)
    except Exception:  # the processor's own work matters more: log loudly and go on
        log.exception("start-up repair failed")
        return
    finally:
        if results is not None:
            results.close()
    log.info("start-up repair", missing=done.missing, repaired=done.repaired, already=done.already,
             rejected=len(done.rejected), unrepairable=len(done.unrepairable),
             remaining=done.remaining, clean=report.clean, seconds=round(done.seconds, 3))  # fmt: skip


def run(settings: Settings, endpoints: Endpoints, config: StreamsConfig) -> None:
    """Migrate the ledger, create the topics, start the metrics endpoint (if a port is
    configured) and consume until SIGTERM/SIGINT (the first drains to zero lag).

    Raises:
        LedgerError: the ledger cannot be migrated or contradicts the price cards.
        StackError: the broker does not answer.
        SystemExit: with the processor's non-zero exit status (see :mod:`.app`).
    """
    configure(settings.log_level)
    engine = make_engine(endpoints.database_url)
    migrate(engine)
    sink = LedgerSink(session_factory(engine), settings)
    sink.prepare()
    repair_on_start(sink, endpoints)
    topics = [config.topic, config.dead_letter_topic, config.violations_topic]
    asyncio.run(
        kafka.ensure_topics(endpoints.kafka_bootstrap, topics, partitions=config.partitions)
    )
    metrics = None
    if config.metrics_port is not None:
        metrics = StreamMetrics()
        port = serve_metrics(config.metrics_host, config.metrics_port,
                             port_file=config.port_file_for(settings.home))  # fmt: skip
        log.info("metrics endpoint", url=f"http://{config.metrics_host}:{port}/metrics")
    # Each batch allocates many short-lived, acyclic objects: fewer collections, and none
    # of them rescanning what start-up loaded, take ~15% off the CPU per event.
    runtime.tune_gc()
    log.info("stream processor starting", app_id=config.app_id, topic=config.topic,
             ledger=endpoints.masked()["database_url"])  # fmt: skip
    # uvloop: the stock loop's polling and callbacks cost ~2-3 µs of CPU per event
    status = loops.run(serve(config, endpoints.kafka_bootstrap, sink, metrics, redis_url=endpoints.redis_url))
    engine.dispose()
    if status:
        raise SystemExit(status)
