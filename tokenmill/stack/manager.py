"""Bringing the local stack up and down.

``up`` starts the missing services in dependency order, waits until each is ready,
records it in the state file at once, and returns while they keep running detached.
Anything that fails mid-way stops what this call started, so a failed ``up`` leaves
nothing behind. ``down`` stops every recorded service in reverse start order.
``tokenmill.stack.status`` checks them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..errors import StackError
from . import health, processes, state
from .builtin import DATABASE, KAFKA, PROBE_OF, REDIS, external_addresses, infrastructure
from .spec import Launch, ServiceSpec, registered_specs, start_order
from .state import ServiceRecord, StackState
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings

log = structlog.get_logger(__name__)

# Popen handles of children started by this process: kept so they are not garbage
# collected with a ResourceWarning while still running (they outlive ``up`` by design).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class UpResult:
    """What ``up`` did."""

    state: StackState
    started: tuple[str, ...]  #: services started by this call
    already_running: tuple[str, ...]  #: services found running and left alone
    external: Mapping[str, str]  #: configured services by name, addresses masked


def up(
    settings: Settings,
    extra: Sequence[ServiceSpec] = (),
    *,
    models: Sequence[str] = (),
    external_timeout_s: float = 5.0,
) -> UpResult:
    """Start whatever of the stack is not running yet and record it.

    Services: the broker and Redis unless configured, those of every factory registered
    with :func:`~tokenmill.stack.spec.register_factory`, then ``extra``. Services already
    running are left alone (so ``up`` is idempotent); a state file with a dead service is
    stale: its survivors are stopped and the stack starts afresh. ``models`` are added to
    those recorded and passed to the factories.

    Raises:
        StackError: a configured service does not answer, or a service failed to start
            (then everything this call started is stopped again).
    """
    home = settings.home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with state.locked(home):
        current = _recover_stale(home, state.load(home))
        running = {r.name: r for r in current.services} if current else {}
        all_models = tuple(dict.fromkeys([*(current.models if current else ()), *models]))

        external = external_addresses(settings)
        to_check = {
            **external,
            **({DATABASE: settings.database_url} if settings.database_url else {}),
        }
        for name, address in to_check.items():
            reason = health.check(PROBE_OF[name], address, timeout_s=external_timeout_s)
            if reason:
                raise StackError(
                    f"configured {name} at {mask_url(address)} does not answer: {reason}"
                )

        specs = [*infrastructure(settings), *registered_specs(settings, all_models), *extra]
        ordered = start_order(specs, satisfied={*running, *external, DATABASE})
        addresses = {
            DATABASE: settings.ledger_url,
            **{r.name: r.address for r in running.values() if r.address},
            **external,  # configured URLs win over anything recorded
        }
        records = list(current.services) if current else []
        started: list[ServiceRecord] = []

        def record_state() -> None:
            state.save(home, StackState(services=tuple(records), models=all_models))

        try:
            for spec in ordered:
                if spec.name in running:
                    continue
                record = _start(spec, home, addresses)
                records.append(record)
                started.append(record)
                if record.address:
                    addresses[spec.name] = record.address
                record_state()  # at once: a crash later still leaves it findable
            record_state()
        except BaseException:
            errors = _stop_all(started)
            if current is not None:
                state.save(home, current)  # as it was before this call
            else:
                state.clear(home)
            if errors:
                log.error("stack.cleanup_failed", errors=errors)
            raise

    for name in running:
        log.info("stack.already_running", service=name)
    return UpResult(
        state=StackState(services=tuple(records), models=all_models),
        started=tuple(r.name for r in started),
        already_running=tuple(running),
        external={name: mask_url(addr) for name, addr in external.items()},
    )


def down(settings: Settings) -> list[str]:
    """Stop every service ``up`` started (reverse start order, process groups, bounded
    waits, SIGKILL fallback) and remove the state file. Safe when nothing is up.

    Returns the names of the services that were still running.

    Raises:
        StackError: a process survived SIGKILL (the state file then keeps it).
    """
    home = settings.home.resolve()
    if not home.exists():
        return []
    with state.locked(home):
        current = state.load(home)
        if current is None:
            return []
        stopped: list[str] = []
        errors = _stop_all(current.services, stopped)
        if errors:
            survivors = tuple(r for r in current.services if r.name in errors)
            state.save(home, current.model_copy(update={"services": survivors}))
            raise StackError("could not stop: " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
        state.clear(home)
    return stopped


# -- internals -----------------------------------------------------------------------


def _child_env(home: Path, addresses: Mapping[str, str]) -> dict[str, str]:
    from ..config.settings import config_path

    # The config `up` read, named explicitly: a child given the services' URLs and no
    # config would (rightly) refuse to fall back to the example's demo keys.
    env = {"TOKENMILL_HOME": str(home), "TOKENMILL_DATABASE_URL": addresses[DATABASE],
           "TOKENMILL_CONFIG": str(config_path().resolve())}
    if KAFKA in addresses:
        env["TOKENMILL_KAFKA_URL"] = addresses[KAFKA]
    if REDIS in addresses:
        env["TOKENMILL_REDIS_URL"] = addresses[REDIS]
    return env


def _start(spec: ServiceSpec, home: Path, addresses: Mapping[str, str]) -> ServiceRecord:
    data_dir = home / "data" / spec.name
    data_dir.mkdir(parents=True, exist_ok=True)
    launch = Launch(
        name=spec.name,
        home=home,
        port=processes.free_port(),
        log_path=home / "logs" / f"{spec.name}.log",
        data_dir=data_dir,
        addresses=dict(addresses),
        env=_child_env(home, addresses),
    )
    proc = processes.start(spec.argv(launch), launch.log_path, env={**launch.env, **spec.env})
    _CHILDREN[proc.pid] = proc
    t0 = time.monotonic()
    try:
        create_time = state.process_create_time(proc.pid)
        processes.wait_ready(
            spec.name,
            proc,
            launch.log_path,
            lambda: spec.is_ready(launch, time.monotonic() - t0),
            timeout_s=spec.start_timeout_s,
        )
    except BaseException:
        # It may have died or been stopped already; its group may still hold children.
        processes.stop_pid(proc.pid, timeout_s=spec.stop_timeout_s)
        processes.stop_group(proc.pid, timeout_s=spec.stop_timeout_s)
        raise
    record = ServiceRecord(
        name=spec.name,
        pid=proc.pid,
        create_time=create_time,
        address=spec.address_of(launch),
        probe=spec.probe,
        log=str(launch.log_path),
        depends_on=spec.depends_on,
        stop_timeout_s=spec.stop_timeout_s,
    )
    log.info(
        "stack.service_started",
        service=spec.name,
        pid=proc.pid,
        address=mask_url(record.address),
        log=record.log,
    )
    return record


def _stop(record: ServiceRecord) -> bool:
    """Stop one service's process group; True if anything of it was running."""
    leader = processes.pid_alive(record.pid)
    if leader and not state.same_process(record.pid, record.create_time):
        # The PID now belongs to another program; neither it nor its group is ours.
        log.warning("stack.pid_reused", service=record.name, pid=record.pid)
        return False
    was_running = (
        processes.stop_pid(record.pid, timeout_s=record.stop_timeout_s) if leader else False
    )
    was_running |= processes.stop_group(record.pid, timeout_s=min(record.stop_timeout_s, 5.0))
    _CHILDREN.pop(record.pid, None)
    return was_running


def _stop_all(records: Iterable[ServiceRecord], stopped: list[str] | None = None) -> dict[str, str]:
    """Stop ``records`` in reverse order (dependents first); returns errors by name."""
    errors: dict[str, str] = {}
    for record in reversed(list(records)):
        try:
            if _stop(record):
                log.info("stack.service_stopped", service=record.name, pid=record.pid)
                if stopped is not None:
                    stopped.append(record.name)
        except StackError as exc:
            errors[record.name] = str(exc)
    return errors


def _recover_stale(home: Path, current: StackState | None) -> StackState | None:
    """``current`` if every recorded service runs; else stop the survivors, clear the
    state and return it without services (a half-dead stack has lost data and
    addresses: start it afresh)."""
    if current is None:
        return None
    dead = current.dead()
    if not dead:
        return current
    log.warning("stack.stale_state", dead=[f"{r.name} (pid {r.pid})" for r in dead])
    errors = _stop_all(current.services)
    if errors:
        raise StackError("stale stack could not be stopped: " + "; ".join(errors.values()))
    state.clear(home)
    return StackState(models=current.models)  # the models asked for still are
