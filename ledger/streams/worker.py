"""Run one stream-processor worker process (``tokenmill streams``)."""

from __future__ import annotations

import asyncio
import logging

from tokenmill.config import Settings

from tokenmill import kafka, loops, runtime
from tokenmill.logs import configure, get_logger
from tokenmill.stack import Endpoints

from ..db import make_engine, migrate, session_factory
from .app import create_app
from .config import StreamsConfig
from .metrics import StreamMetrics, serve
from .sink import LedgerSink

log = get_logger(__name__)


def run(settings: Settings, endpoints: Endpoints, config: StreamsConfig) -> None:
    """Migrate the ledger, create the topics, start the metrics endpoint (if a port is
    configured) and run a faust worker until SIGTERM/SIGINT.

    Raises:
        LedgerError: the ledger cannot be migrated or contradicts the price cards.
        StackError: the broker does not answer.
    """
    configure(settings.log_level)
    engine = make_engine(endpoints.database_url)
    migrate(engine)
    sink = LedgerSink(session_factory(engine), settings)
    sink.prepare()
    topics = [config.topic, config.dead_letter_topic, config.violations_topic]
    asyncio.run(
        kafka.ensure_topics(endpoints.kafka_bootstrap, topics, partitions=config.partitions)
    )
    metrics = None
    if config.metrics_port is not None:
        metrics = StreamMetrics()
        port = serve(config.metrics_host, config.metrics_port,
                     port_file=config.port_file_for(settings.home))  # fmt: skip
        log.info("metrics endpoint", url=f"http://{config.metrics_host}:{port}/metrics")
    # faust runs on a loop of its own (asyncio.run above closed the previous one): uvloop,
    # also for the consumer's thread, which makes its loop with asyncio.new_event_loop().
    # The stock loop's polling and callbacks cost ~2-3 µs of CPU per event.
    loops.use_for_new_loops()
    asyncio.set_event_loop(asyncio.new_event_loop())
    # Each batch allocates many short-lived, acyclic objects: fewer collections, and none
    # of them rescanning what start-up loaded, take ~15% off the CPU per event.
    runtime.tune_gc()
    app = create_app(settings, config, endpoints.kafka_bootstrap, sink, metrics)
    from faust.worker import Worker

    level = logging.getLevelName(logging.getLevelName(settings.log_level.upper()))
    worker = Worker(app, loglevel=str(level).lower().replace("warning", "warn"), quiet=True)
    log.info("stream processor starting", app_id=config.app_id, topic=config.topic,
             ledger=endpoints.masked()["database_url"])  # fmt: skip
    worker.execute_from_commandline()

