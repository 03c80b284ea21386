"""Bringing the local stack up and down.

``up`` starts the missing services in dependency order, waits until each is ready,
records it in the state file at once, and returns while they keep running detached.
Anything that fails mid-way stops what this call started, so a failed ``up`` leaves
nothing behind. A service that died is started again on its own, next to the running
rest; only a dead broker or Redis restarts everything (see :func:`up`). The supervisor
(:mod:`tokenmill.stack.supervisor`, started by ``up(supervise=True)``) does that as
soon as a service dies, through :func:`up` too; :func:`restart` replaces one service.
``down`` stops the services stage by stage (:class:`~tokenmill.stack.spec.StopStage`):
the supervisor, intake, then the workers, then the stream processors once drained,
then the broker and Redis. ``tokenmill.stack.status`` checks them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..errors import StackError
from . import health, processes, state
from .builtin import (
    DATABASE,
    HOLDS_DATA,
    KAFKA,
    PROBE_OF,
    REDIS,
    SUPERVISOR,
    external_addresses,
    infrastructure,
    supervisor_service,
)
from .spec import Launch, ServiceSpec, StopStage, registered_specs, start_order
from .state import ServiceRecord, StackState
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings

log = structlog.get_logger(__name__)

#: SIGTERM → SIGKILL bound for every service while the broker is dead: nothing can
#: drain into or out of it, so waiting a stream processor's full drain time is waste
NO_BROKER_STOP_TIMEOUT_S = 10.0

# Popen handles of children started by this process: kept so they are not garbage
# collected with a ResourceWarning while still running (they outlive ``up`` by design).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class UpResult:
    """What ``up`` did."""

    state: StackState
    started: tuple[str, ...]  #: services started by this call (restarted ones included)
    already_running: tuple[str, ...]  #: services found running and left alone
    external: Mapping[str, str]  #: configured services by name, addresses masked
    restarted: tuple[str, ...] = ()  #: of ``started``, those that replaced a dead process


def up(
    settings: Settings,
    extra: Sequence[ServiceSpec] = (),
    *,
    models: Sequence[str] = (),
    external_timeout_s: float = 5.0,
    supervise: bool = False,
    defer: Collection[str] = (),
    revive_only: bool = False,
) -> UpResult:
    """Start whatever of the stack is not running yet and record it.

    Services: the broker and Redis unless configured, those of every factory registered
    with :func:`~tokenmill.stack.spec.register_factory`, then ``extra``, then — with
    ``supervise`` — the supervisor (``tokenmill supervise``, see
    :mod:`tokenmill.stack.supervisor`), which from then on restarts a service that dies
    by calling this function. Services already running are left alone (so ``up`` is
    idempotent). A recorded service that died is started again (its restart count goes
    up), on its old port when that is free, and the others keep running — with the
    broker's topics and Redis's data. Only when the embedded broker or Redis died is
    everything (the supervisor aside) stopped and started afresh (Redis then reloads
    its append-only file; the broker's topics are gone). Dead services named in
    ``defer`` stay dead and recorded for now (the supervisor's backoff); with
    ``revive_only`` nothing starts unless a stack is recorded (the supervisor must not
    bring back a stack that ``down`` stopped meanwhile). ``models`` are added to those
    recorded and passed to the factories.

    Raises:
        StackError: a configured service does not answer, or a service failed to start
            (then everything this call started is stopped again).
    """
    home = settings.home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with state.locked(home):
        loaded = state.load(home)
        if revive_only and loaded is None:
            return UpResult(state=StackState(), started=(), already_running=(), external={})
        result = _up_locked(
            settings,
            home,
            loaded,
            extra,
            models=models,
            external_timeout_s=external_timeout_s,
            supervise=supervise,
            defer=defer,
        )
    for name in result.already_running:
        log.debug("stack.already_running", service=name)
    return result


def restart(settings: Settings, name: str, extra: Sequence[ServiceSpec] = ()) -> UpResult:
    """Restart the recorded service ``name``: stop its process group (SIGTERM, its
    bounded wait, SIGKILL), start it again on the same port, record it. The broker or
    Redis restarts the whole stack, as their death does (see :func:`up`).

    Raises:
        StackError: nothing is up, ``name`` is not a recorded service (the message lists
            those that are), or it failed to start again.
    """
    home = settings.home.resolve()
    with state.locked(home):
        loaded = state.load(home)
        if loaded is None:
            raise StackError("nothing is running here: start the stack with `tokenmill up`")
        record = loaded.service(name)
        if record is None:
            known = ", ".join(r.name for r in loaded.services)
            raise StackError(f"no service {name!r} in the stack; known: {known}")
        supervised = loaded.service(SUPERVISOR) is not None
        defined = {s.name for s in _specs(settings, loaded.models, extra, supervised)}
        if name not in defined:
            raise StackError(f"{name!r} was started with a definition this command lacks")
        log.info("stack.restarting", service=name, pid=record.pid, reason="asked")
        _stop(record)
        return _up_locked(settings, home, loaded, extra, supervise=supervised)


def _specs(
    settings: Settings, models: Sequence[str], extra: Sequence[ServiceSpec], supervise: bool
) -> list[ServiceSpec]:
    specs = [*infrastructure(settings), *registered_specs(settings, models), *extra]
    if supervise:
        specs.append(supervisor_service(watched=[s.name for s in specs]))
    return specs


def _up_locked(
    settings: Settings,
    home: Path,
    loaded: StackState | None,
    extra: Sequence[ServiceSpec] = (),
    *,
    models: Sequence[str] = (),
    external_timeout_s: float = 5.0,
    supervise: bool = False,
    defer: Collection[str] = (),
) -> UpResult:
    """:func:`up` once the state lock is held and the state ``loaded``."""
    current, replacing = _recover(home, loaded, defer)
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
            raise StackError(f"configured {name} at {mask_url(address)} does not answer: {reason}")

    specs = _specs(settings, all_models, extra, supervise)
    ordered = start_order(specs, satisfied={*running, *external, DATABASE})
    addresses = {
        DATABASE: settings.ledger_url,
        **{r.name: r.address for r in running.values() if r.address},
        **external,  # configured URLs win over anything recorded
    }
    records = list(current.services) if current else []
    started: list[ServiceRecord] = []

    # A restarted service keeps its place in the file (and in `status`).
    place = {r.name: i for i, r in enumerate(loaded.services if loaded else ())}

    def record_state() -> None:
        records.sort(key=lambda r: place.get(r.name, len(place)))
        state.save(home, StackState(services=tuple(records), models=all_models))

    try:
        for wave in _waves([s for s in ordered if s.name not in running]):
            # A wave's services depend only on earlier waves: start them together, then
            # wait for each (their imports and connects overlap).
            launched = [_launch(spec, home, addresses, replacing.get(spec.name)) for spec in wave]
            try:
                while launched:
                    record = _await_ready(launched.pop(0))  # stops it if it fails
                    records.append(record)
                    started.append(record)
                    if record.address:  # for the next waves (this one has launched)
                        addresses[record.name] = record.address
                    record_state()  # at once: a crash later still leaves it findable
            finally:
                for rest in launched:  # a wave-mate failed: stop those not yet recorded
                    _abandon(rest.spec, rest.proc)
        record_state()
    except BaseException:
        errors = _stop_all(started)
        if loaded is not None:
            state.save(home, loaded)  # as it was: the next `up` recovers it again
        else:
            state.clear(home)
        if errors:
            log.error("stack.cleanup_failed", errors=errors)
        raise

    return UpResult(
        state=StackState(services=tuple(records), models=all_models),
        started=tuple(r.name for r in started),
        already_running=tuple(n for n in running if n not in defer),
        external={name: mask_url(addr) for name, addr in external.items()},
        restarted=tuple(r.name for r in started if r.name in replacing),
    )


def down(settings: Settings) -> list[str]:
    """Stop every service ``up`` started, stage by stage (intake, then the workers, then
    the stream processors once they drained, then the broker and Redis; see
    :class:`~tokenmill.stack.spec.StopStage`), each by its process group with a bounded
    wait and a SIGKILL fallback, and remove the state file. Safe when nothing is up.

    Returns the names of the services that were still running, in the order stopped.

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


def _child_env(home: Path, addresses: Mapping[str, str], *, stack_urls: bool = True) -> dict[str, str]:
    from ..config.settings import config_path

    # The config `up` read, named explicitly: a child given the services' URLs and no
    # config would (rightly) refuse to fall back to the example's demo keys.
    env = {
        "TOKENMILL_HOME": str(home),
        "TOKENMILL_CONFIG": str(config_path().resolve()),
    }
    if not stack_urls:
        return env  # the caller's own environment (inherited) says what is configured
    env["TOKENMILL_DATABASE_URL"] = addresses[DATABASE]
    if KAFKA in addresses:
        env["TOKENMILL_KAFKA_URL"] = addresses[KAFKA]
    if REDIS in addresses:
        env["TOKENMILL_REDIS_URL"] = addresses[REDIS]
    return env


def _waves(specs: Sequence[ServiceSpec]) -> list[list[ServiceSpec]]:
    """``specs`` (in start order) grouped so that each service's dependencies among them
    are in an earlier group; others (running, external) are met already."""
    level: dict[str, int] = {}
    for spec in specs:
        level[spec.name] = 1 + max((level[d] for d in spec.depends_on if d in level), default=-1)
    waves: list[list[ServiceSpec]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for spec in specs:
        waves[level[spec.name]].append(spec)
    return waves


@dataclass
class _Launched:
    spec: ServiceSpec
    launch: Launch
    proc: subprocess.Popen[bytes]
    create_time: float
    t0: float
    previous: ServiceRecord | None


def _launch(
    spec: ServiceSpec, home: Path, addresses: Mapping[str, str], previous: ServiceRecord | None
) -> _Launched:
    """Start ``spec``'s process (not waiting for it); ``previous`` is the record of the
    process it replaces (whose port it gets back when free)."""
    data_dir = home / "data" / spec.name
    data_dir.mkdir(parents=True, exist_ok=True)
    launch = Launch(
        name=spec.name,
        home=home,
        port=processes.free_port(previous.port if previous else spec.preferred_port),
        log_path=home / "logs" / f"{spec.name}.log",
        data_dir=data_dir,
        addresses=dict(addresses),
        env=_child_env(home, addresses, stack_urls=spec.stack_urls),
    )
    proc = processes.start(spec.argv(launch), launch.log_path, env={**launch.env, **spec.env})
    _CHILDREN[proc.pid] = proc
    t0 = time.monotonic()
    try:
        create_time = state.process_create_time(proc.pid)
    except BaseException:
        _abandon(spec, proc)
        raise
    return _Launched(spec, launch, proc, create_time, t0, previous)


def _await_ready(started: _Launched) -> ServiceRecord:
    """Wait until the launched service is ready (stopping it if it is not) and record it."""
    spec, launch, proc, previous = started.spec, started.launch, started.proc, started.previous
    try:
        processes.wait_ready(
            spec.name,
            proc,
            launch.log_path,
            lambda: spec.is_ready(launch, time.monotonic() - started.t0),
            timeout_s=max(0.0, spec.start_timeout_s - (time.monotonic() - started.t0)),
        )
    except BaseException:
        _abandon(spec, proc)
        raise
    record = ServiceRecord(
        name=spec.name,
        pid=proc.pid,
        create_time=started.create_time,
        address=spec.address_of(launch),
        probe=spec.probe,
        log=str(launch.log_path),
        depends_on=spec.depends_on,
        stop_timeout_s=spec.stop_timeout,
        stop_stage=spec.stop_stage,
        port=launch.port,
        restarts=previous.restarts + 1 if previous else 0,
    )
    log.info(
        "stack.service_restarted" if previous else "stack.service_started",
        service=spec.name,
        pid=proc.pid,
        address=mask_url(record.address),
        log=record.log,
        restarts=record.restarts,
    )
    return record


def _abandon(spec: ServiceSpec, proc: subprocess.Popen[bytes]) -> None:
    # It may have died or been stopped already; its group may still hold children.
    processes.stop_pid(proc.pid, timeout_s=spec.stop_timeout)
    processes.stop_group(proc.pid, timeout_s=spec.stop_timeout)
    _CHILDREN.pop(proc.pid, None)


def _stop(record: ServiceRecord, timeout_cap: float | None = None) -> bool:
    """Stop one service's process group; True if anything of it was running."""
    leader = processes.pid_alive(record.pid)
    if leader and not state.same_process(record.pid, record.create_time):
        # The PID now belongs to another program; neither it nor its group is ours.
        log.warning("stack.pid_reused", service=record.name, pid=record.pid)
        return False
    timeout_s = min(record.stop_timeout_s, timeout_cap or record.stop_timeout_s)
    was_running = processes.stop_pid(record.pid, timeout_s=timeout_s) if leader else False
    was_running |= processes.stop_group(record.pid, timeout_s=min(timeout_s, 5.0))
    _CHILDREN.pop(record.pid, None)
    return was_running


def _stop_all(records: Iterable[ServiceRecord], stopped: list[str] | None = None) -> dict[str, str]:
    """Stop ``records`` stage by stage; within a stage, in waves of services no other
    service of the stage depends on, each wave at once. Returns errors by name."""
    remaining = list(records)
    kafka = next((r for r in remaining if r.name == KAFKA), None)
    cap = NO_BROKER_STOP_TIMEOUT_S if kafka is not None and not kafka.alive() else None
    errors: dict[str, str] = {}
    while remaining:
        stage = min(r.stop_stage for r in remaining)
        peers = [r for r in remaining if r.stop_stage == stage]
        needed = {dep for r in peers for dep in r.depends_on}
        wave = [r for r in peers if r.name not in needed] or peers
        log.info("stack.stopping", stage=stage.name, services=[r.name for r in wave])
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            outcomes = list(pool.map(lambda r: _stop_outcome(r, cap), wave))
        for record, outcome in reversed(list(zip(wave, outcomes, strict=True))):
            remaining.remove(record)
            if isinstance(outcome, StackError):
                errors[record.name] = str(outcome)
            elif outcome:
                log.info("stack.service_stopped", service=record.name, pid=record.pid)
                if stopped is not None:
                    stopped.append(record.name)
    return errors


def _stop_outcome(record: ServiceRecord, cap: float | None) -> bool | StackError:
    try:
        return _stop(record, cap)
    except StackError as exc:
        return exc


def _recover(
    home: Path, current: StackState | None, defer: Collection[str] = ()
) -> tuple[StackState | None, dict[str, ServiceRecord]]:
    """What of ``current`` still runs, and the records of the services to start again.

    A dead service is restarted alone (its leftover process group stopped first), unless
    ``defer`` names it: then it stays dead and recorded. A dead broker or Redis lost its
    data or its address for everyone: then every survivor but the supervisor (which
    needs neither, and may be the caller) is stopped too and the whole stack restarted.
    """
    if current is None:
        return None, {}
    dead = current.dead()
    if not dead:
        return current, {}
    if any(r.name in HOLDS_DATA for r in dead):
        log.warning("stack.restarting_everything", dead=[f"{r.name} (pid {r.pid})" for r in dead])
        kept = tuple(r for r in current.services if r.stop_stage is StopStage.supervisor and r not in dead)
        errors = _stop_all(r for r in current.services if r not in kept)
        if errors:
            raise StackError("the stack could not be stopped for a clean restart: " + "; ".join(errors.values()))
        state.clear(home)
        # the models asked for still are; every service comes back as a restart
        return StackState(services=kept, models=current.models), {
            r.name: r for r in current.services if r not in kept
        }
    now = [r for r in dead if r.name not in defer]
    if not now:
        return current, {}
    log.warning("stack.restarting_dead", dead=[f"{r.name} (pid {r.pid})" for r in now])
    for record in now:
        _stop(record)  # what its process group left behind (a dead leader's children)
    survivors = tuple(r for r in current.services if r not in now)
    return current.model_copy(update={"services": survivors}), {r.name: r for r in now}
