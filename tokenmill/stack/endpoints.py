"""Where the stack's services are: the one resolver every component uses.

Configured URLs (``TOKENMILL_KAFKA_URL`` etc.) win; otherwise the addresses that
``tokenmill up`` recorded in ``<home>/stack.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import StackError
from . import state
from .builtin import KAFKA, REDIS
from .urls import mask_url, normalize_kafka_url

if TYPE_CHECKING:
    from ..config.settings import Settings


@dataclass(frozen=True)
class Endpoints:
    """Addresses of the services, ready for the client libraries."""

    kafka_bootstrap: str  #: ``host:port[,host:port]`` as aiokafka wants it
    redis_url: str  #: ``redis://…`` (may hold a password: print :meth:`masked` instead)
    database_url: str  #: SQLAlchemy URL of the ledger

    def masked(self) -> dict[str, str]:
        """The addresses with passwords masked, for logs and output."""
        return {
            "kafka_bootstrap": mask_url(self.kafka_bootstrap),
            "redis_url": mask_url(self.redis_url),
            "database_url": mask_url(self.database_url),
        }

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return "Endpoints(" + ", ".join(f"{k}={v!r}" for k, v in self.masked().items()) + ")"


def endpoints(settings: Settings) -> Endpoints:
    """Resolve the stack's addresses for ``settings``.

    Raises:
        StackError: a service is neither configured nor recorded as running by
            ``tokenmill up`` (the message says to run it).
        ConfigError: ``kafka_url`` cannot be read.
    """
    recorded: state.StackState | None = None
    loaded = False

    def from_state(name: str, setting: str) -> str:
        nonlocal recorded, loaded
        if not loaded:
            recorded, loaded = state.load(settings.home), True
        record = recorded.service(name) if recorded else None
        if record is None:
            raise StackError(
                f"no {name} configured (TOKENMILL_{setting}) and the local stack in "
                f"{settings.home} is not up: run `tokenmill up` first"
            )
        if not record.alive():
            raise StackError(
                f"the local stack's {name} (pid {record.pid}) is not running: "
                "run `tokenmill up` first"
            )
        return record.address

    kafka = (
        normalize_kafka_url(settings.kafka_url)
        if settings.kafka_url
        else from_state(KAFKA, "KAFKA_URL")
    )
    redis = settings.redis_url or from_state(REDIS, "REDIS_URL")
    return Endpoints(kafka_bootstrap=kafka, redis_url=redis, database_url=settings.ledger_url)
