"""``tokenmill status``: every recorded, configured and expected service, checked live
and concurrently; addresses and reasons come back with passwords masked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import health, state
from .builtin import DATABASE, KAFKA, PROBE_OF, REDIS, external_addresses
from .state import ServiceRecord
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``tokenmill status``; ``address`` is masked."""

    name: str
    address: str
    pid: int | None  #: None for external services and the database
    managed: bool  #: started by ``up`` (else external, or the database)
    healthy: bool
    detail: str  #: "ok" or why not
    log: str | None = None
    restarts: int = 0  #: times ``up`` started it again after it had died


@dataclass(frozen=True)
class StackStatus:
    home: str
    models: tuple[str, ...]
    services: tuple[ServiceStatus, ...]

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.services)

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "home": self.home,
            "models": list(self.models),
            "services": [asdict(s) for s in self.services],
        }


def check_stack(settings: Settings, *, timeout_s: float = health.DEFAULT_TIMEOUT_S) -> StackStatus:
    """Check every recorded, configured and expected service live, concurrently."""
    home = settings.home.resolve()
    current = state.load(home) if home.exists() else None
    records = current.services if current else ()
    external = external_addresses(settings)

    checks: list[tuple[str, str, str, ServiceRecord | None]] = [
        (r.name, r.address, r.probe, r) for r in records
    ]
    checks += [(name, addr, PROBE_OF[name], None) for name, addr in external.items()]
    checks.append((DATABASE, settings.ledger_url, "database", None))
    missing = [
        n
        for n in (KAFKA, REDIS)
        if n not in external and (current is None or not current.service(n))
    ]

    def run(item: tuple[str, str, str, ServiceRecord | None]) -> ServiceStatus:
        name, address, kind, record = item
        if record is not None and not record.alive():
            reason: str | None = "process not running (`tokenmill up` restarts it)"
        else:
            reason = health.check(kind, address, timeout_s=timeout_s)
        return ServiceStatus(
            name=name,
            address=mask_url(address),
            pid=record.pid if record else None,
            managed=record is not None,
            healthy=reason is None,
            detail=reason or "ok",
            log=record.log if record else None,
            restarts=record.restarts if record else 0,
        )

    with ThreadPoolExecutor(max_workers=min(len(checks), 8)) as pool:
        rows = list(pool.map(run, checks))
    rows[-1:-1] = [  # before the database row
        ServiceStatus(name, "", None, False, False, "not started: run `tokenmill up`")
        for name in missing
    ]
    return StackStatus(
        home=str(home), models=current.models if current else (), services=tuple(rows)
    )
