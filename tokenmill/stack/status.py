"""``tokenmill status``: every recorded, configured and expected service, checked live
and concurrently; addresses and reasons come back with passwords masked.

A service is ``down`` when its process is gone or its own probe fails, ``degraded``
when it runs but a service it depends on (its spec's ``depends_on``: the broker,
Redis …) is down — it cannot do its work. Every live copy of a service that announces
itself in Redis (:mod:`tokenmill.presence`: role, lag …) is listed under it, so copies
started by hand, or on other machines, show too.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from .. import presence
from . import health, state
from .builtin import DATABASE, KAFKA, PROBE_OF, REDIS, SUPERVISOR, external_addresses
from .state import ServiceRecord
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings

Health = Literal["ok", "degraded", "down"]


@dataclass(frozen=True)
class CopyStatus:
    """One live copy of a service, as it announced itself (:mod:`tokenmill.presence`)."""

    instance: str  #: ``host:pid``
    role: str  #: ``active`` | ``standby`` | ``copy``
    pid: int | None  #: when the instance name is ``host:pid`` of this host
    managed: bool  #: the copy ``up`` started (its recorded process)
    age_s: float  #: seconds since it last announced itself
    detail: dict[str, Any]  #: e.g. ``{"lag": 12}``


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``tokenmill status``; ``address`` is masked."""

    name: str
    address: str
    pid: int | None  #: None for external services, the database, and unrecorded copies
    managed: bool  #: started by ``up`` (else external, the database, or by hand)
    healthy: bool  #: ``state == "ok"``
    detail: str  #: "ok" or why not
    log: str | None = None
    restarts: int = 0  #: times it was started again after it had died (or was restarted)
    state: Health = "ok"
    copies: tuple[CopyStatus, ...] = ()


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
            by = "`tokenmill up`" if name == SUPERVISOR else "the supervisor or `tokenmill up`"
            reason: str | None = f"process not running (restarted by {by})"
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
            state="ok" if reason is None else "down",
        )

    with ThreadPoolExecutor(max_workers=min(len(checks), 8)) as pool:
        rows = list(pool.map(run, checks))
    rows = _degraded(rows, {r.name: r for r in records})
    redis_url = external.get(REDIS) or next((r.address for r in records if r.name == REDIS), None)
    if redis_url and all(r.state == "ok" for r in rows if r.name == REDIS):
        rows = _with_copies(rows, _copies(redis_url, timeout_s), {r.name: r.pid for r in records})
    at = next(i for i, r in enumerate(rows) if r.name == DATABASE)
    rows[at:at] = [  # before the database row
        ServiceStatus(name, "", None, False, False, "not started: run `tokenmill up`", state="down")
        for name in missing
    ]
    return StackStatus(
        home=str(home), models=current.models if current else (), services=tuple(rows)
    )


def _degraded(rows: list[ServiceStatus], records: dict[str, ServiceRecord]) -> list[ServiceStatus]:
    """Running services whose dependencies are down say so (the supervisor's
    ``depends_on`` only orders its start: it needs none of them to work)."""
    down = {r.name for r in rows if r.state == "down"}
    out = []
    for row in rows:
        record = records.get(row.name)
        lost = (
            [d for d in record.depends_on if d in down] if record and row.name != SUPERVISOR else []
        )
        if row.state == "ok" and lost:
            detail = "degraded: " + ", ".join(f"{d} unreachable" for d in lost)
            row = replace(row, healthy=False, state="degraded", detail=detail)
        out.append(row)
    return out


def _copies(redis_url: str, timeout_s: float) -> list[presence.Instance]:
    import redis

    client = redis.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        return presence.live_instances(client)
    except redis.RedisError:
        return []  # the redis row says why
    finally:
        client.close()


def _with_copies(
    rows: list[ServiceStatus], instances: list[presence.Instance], recorded_pids: dict[str, int]
) -> list[ServiceStatus]:
    """Each service's live copies under its row; a service that only runs by hand (no
    record) gets a row of its own, before the database row."""
    import time

    host, now = socket.gethostname(), time.time()
    by_service: dict[str, list[CopyStatus]] = {}
    for inst in instances:
        name, _, pid_text = inst.instance.rpartition(":")
        pid = int(pid_text) if name == host and pid_text.isdigit() else None
        by_service.setdefault(inst.service, []).append(
            CopyStatus(
                instance=inst.instance,
                role=inst.role,
                pid=pid,
                managed=pid is not None and recorded_pids.get(inst.service) == pid,
                age_s=round(max(0.0, now - inst.ts), 1),
                detail=dict(inst.detail),
            )
        )
    out = [replace(r, copies=tuple(by_service.pop(r.name, ()))) for r in rows]
    at = next(i for i, r in enumerate(out) if r.name == DATABASE)
    out[at:at] = [
        ServiceStatus(
            name, "", None, False, True, "ok (not started by `tokenmill up`)", copies=tuple(copies)
        )
        for name, copies in sorted(by_service.items())
    ]
    return out
