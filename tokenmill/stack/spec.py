"""What a managed service is (:class:`ServiceSpec`), what it is given at launch
(:class:`Launch`), the order services start in, and the registry of service factories.

Later components plug into ``tokenmill up`` in one of two ways:

* pass specs directly: ``manager.up(settings, extra=[ServiceSpec(...)])``;
* or register a factory at import time, which ``up`` calls with the settings and the
  ``--model`` names (the CLI imports each subsystem's ``commands`` module, so calling
  :func:`register_factory` from its ``register(app)`` is enough)::

      def worker_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
          return [ServiceSpec(name=f"worker-{m}", argv=..., depends_on=("kafka", "redis"))
                  for m in models]

      register_factory(worker_services)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StackError
from . import health

if TYPE_CHECKING:
    from ..config.settings import Settings

#: how long a service without a readiness signal must stay alive to count as started
PID_SETTLE_S = 0.5

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class StopStage(IntEnum):
    """When ``down`` stops a service: every service of a stage has exited before the
    next stage is signalled, so nothing is accepted that cannot be finished, and the
    events of finished work are consumed before the broker that holds them goes."""

    #: the supervisor, first of all: it must not restart what ``down`` stops
    supervisor = -1
    #: takes new work in: the gateway, the batch runner, the scheduler
    intake = 0
    #: does the accepted work: workers, the webhook dispatcher (the default)
    processing = 1
    #: consumes what the others produced (stream processors), to lag 0, then exits
    drain = 2
    #: the broker and Redis, last
    infrastructure = 3


#: how long a draining service may take between SIGTERM and SIGKILL: the stream
#: processor consumes to lag 0 within ~30 s of SIGTERM, commits and exits
DRAIN_STOP_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class Launch:
    """What a service's builders get when it starts."""

    name: str
    home: Path  #: the state directory, absolute
    #: a free loopback port reserved for this service (ignore it if unused): a restarted
    #: service's old one when free, so its clients find it again
    port: int
    log_path: Path  #: ``<home>/logs/<name>.log``; stdout and stderr go there
    data_dir: Path  #: ``<home>/data/<name>``, created; for files the service keeps
    #: addresses of the services already up (``kafka``, ``redis``, ``database`` and those
    #: of earlier start waves: services whose dependencies are all up start together),
    #: configured external ones included
    addresses: Mapping[str, str]
    #: ``TOKENMILL_HOME`` / ``_KAFKA_URL`` / ``_REDIS_URL`` / ``_DATABASE_URL`` pointing at
    #: the resolved stack; every child gets them, so it never depends on the state file
    env: Mapping[str, str]


@dataclass(frozen=True)
class ServiceSpec:
    """A child process that ``tokenmill up`` starts, records, checks and stops.

    ``argv`` builds the command line; ``address`` what clients connect to (shown by
    ``status``, given to later services in :attr:`Launch.addresses`); ``probe`` names
    the health check in :data:`tokenmill.stack.health.PROBES` that ``status`` runs on the
    address (``"pid"``: alive is healthy). ``ready`` decides when start-up is done;
    by default the probe answering. ``depends_on`` names services (or the external
    ``kafka``/``redis``/``database``) that must be up first. ``down`` stops services
    stage by stage (:class:`StopStage`), dependents before their dependencies within one.
    A service with neither ``ready`` nor a protocol probe counts as started once it has
    stayed alive for :data:`PID_SETTLE_S`, so one that dies at once fails ``up``.
    """

    name: str
    argv: Callable[[Launch], Sequence[str]]
    probe: str = "pid"
    address: Callable[[Launch], str] | None = None
    ready: Callable[[Launch], bool] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    stop_stage: StopStage = StopStage.processing
    #: the port :attr:`Launch.port` should be on a first start, when it is free (a
    #: restart keeps the old one); None: any free port
    preferred_port: int | None = None
    #: given the resolved stack's URLs (``TOKENMILL_KAFKA_URL`` …) in its environment;
    #: False for the supervisor, which must resolve the stack as ``up`` does (an embedded
    #: broker's address in its environment would read as a configured, external one)
    stack_urls: bool = True

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise StackError(f"bad service name {self.name!r}: lowercase letters, digits, _.-")
        health.probe(self.probe)  # an unknown probe fails here, not in `status`

    @property
    def stop_timeout(self) -> float:
        """Seconds between SIGTERM and SIGKILL; a draining service gets time to drain."""
        if self.stop_stage is StopStage.drain:
            return max(self.stop_timeout_s, DRAIN_STOP_TIMEOUT_S)
        return self.stop_timeout_s

    def address_of(self, launch: Launch) -> str:
        return self.address(launch) if self.address else ""

    def is_ready(self, launch: Launch, alive_s: float) -> bool:
        """Start-up is done (``alive_s``: seconds since the process started)."""
        if self.ready is not None:
            return self.ready(launch)
        if self.probe == "pid":
            return alive_s >= PID_SETTLE_S
        return health.check(self.probe, self.address_of(launch), timeout_s=1.0) is None


def start_order(specs: Sequence[ServiceSpec], satisfied: Collection[str] = ()) -> list[ServiceSpec]:
    """``specs`` with every service after its dependencies (stable otherwise).

    ``satisfied`` names dependencies already met (running or external).

    Raises:
        StackError: a duplicate name, an unknown dependency, or a cycle.
    """
    by_name: dict[str, ServiceSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise StackError(f"service {spec.name!r} is defined twice")
        by_name[spec.name] = spec
    for spec in specs:
        for dep in spec.depends_on:
            if dep not in by_name and dep not in satisfied:
                raise StackError(f"service {spec.name!r} depends on unknown service {dep!r}")
    ordered: list[ServiceSpec] = []
    placed: set[str] = set(satisfied)
    pending = list(specs)
    while pending:
        ready = [s for s in pending if all(d in placed for d in s.depends_on)]
        if not ready:
            raise StackError(f"dependency cycle among {', '.join(s.name for s in pending)}")
        ordered.append(ready[0])
        placed.add(ready[0].name)
        pending.remove(ready[0])
    return ordered


ServiceFactory = Callable[["Settings", Sequence[str]], Iterable[ServiceSpec]]
_FACTORIES: list[ServiceFactory] = []


def register_factory(factory: ServiceFactory) -> ServiceFactory:
    """Have every ``tokenmill up`` also start ``factory(settings, models)``'s services.

    Registering the same function twice is a no-op. Usable as a decorator.
    """
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)
    return factory


def registered_specs(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    """The services of every registered factory, in registration order."""
    return [spec for factory in _FACTORIES for spec in factory(settings, models)]
