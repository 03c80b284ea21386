"""Settings of the stream processors: ``TOKENMILL_STREAMS__*`` environment variables.

They are read on their own (not through :class:`~tokenmill.config.Settings`, whose
file schema forbids unknown sections), with the prefix a future ``[streams]`` section
of the settings file would have, so the names stay valid if it is added. Tests and
side-by-side deployments isolate themselves with their own ``APP_ID`` (the Kafka
consumer group) and topic names.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenmill.wire import DEAD_LETTER_TOPIC, SLA_VIOLATIONS_TOPIC, TOKEN_EVENTS_TOPIC

#: port of the Prometheus endpoint in the deployed stack
DEFAULT_METRICS_PORT = 9464


class StreamsConfig(BaseSettings):
    """How the stream processors consume, batch, publish and export."""

    model_config = SettingsConfigDict(env_prefix="TOKENMILL_STREAMS__", extra="ignore", frozen=True)

    #: the Kafka consumer group of the stream processors
    app_id: str = Field(default="tokenmill-streams", min_length=1, max_length=200)
    topic: str = TOKEN_EVENTS_TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    violations_topic: str = SLA_VIOLATIONS_TOPIC
    #: partitions of topics created at start (existing topics are left as they are)
    partitions: int = Field(default=8, gt=0)
    #: most events fetched at once, and (about) the most written in one transaction;
    #: a batch is whatever has arrived, so it stays small (and fast) under light load
    batch_max: int = Field(default=5000, gt=0)
    #: how often the offsets of events written to the ledger are committed (also at
    #: every rebalance and at stop); a crash replays at most this much, as no-ops
    commit_interval_s: float = Field(default=2.0, gt=0)
    #: on SIGTERM, how long to go on consuming to reach zero lag before stopping anyway
    drain_timeout_s: float = Field(default=30.0, gt=0)
    #: Prometheus endpoint; port None: none, 0: a free port (written to ``metrics_port_file``)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_port_file: Path | None = None
    #: window of the goodput and attainment gauges, read from the ledger
    sla_window_s: float = Field(default=300.0, gt=0)
    #: window of the fair-share gauges (every request finished in it is read, each refresh:
    #: keep it short at high throughput)
    fairness_window_s: float = Field(default=60.0, gt=0)
    #: how often those gauges are refreshed
    gauge_interval_s: float = Field(default=10.0, gt=0)

    def port_file_for(self, home: Path) -> Path:
        return (
            self.metrics_port_file or home / "streams" / f"{self.app_id}.metrics-port"
        ).resolve()
