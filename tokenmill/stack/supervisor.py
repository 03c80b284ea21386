"""``tokenmill supervise``: keep what ``tokenmill up`` started alive.

``up`` starts this loop as a service of its own (recorded in the state file, stopped
first by ``down``). About every :data:`POLL_S` it reads the state file and checks each
recorded process; one that died on its own is started again through
:func:`tokenmill.stack.manager.up` — the one home of the restart logic: a dead service
alone, next to the running rest; a dead embedded broker or Redis, the clean full
restart (batches then resume from the ledger; callers in flight get a 503 naming what
was lost). Whatever a service's exit code says (a crash, a scheduler that lost its
lease and stepped down) it is simply started again.

Repeated crashes back off per service (:class:`Backoff`: at once, then 1 s, 2 s, 4 s …
up to :data:`BACKOFF_CAP_S`), reset once it stayed up for :data:`STABLE_S`. Each
restart is logged (``supervisor.restarted``) with the reason and, when this process
had started the dead one itself, its exit code (a process ``up`` started is not our
child, and its exit status is not ours to read).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import StackError
from ..logs import get_logger
from . import manager, processes, state
from .builtin import HOLDS_DATA, SUPERVISOR
from .spec import ServiceSpec
from .state import ServiceRecord, StackState

if TYPE_CHECKING:
    from ..config.settings import Settings

log = get_logger(__name__)

#: how often the recorded processes are checked: a death is seen within this
POLL_S = 0.25
#: the first retry after a crash in a row waits this long, each further one twice as long
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
#: a service that ran this long before dying starts its count of crashes afresh
STABLE_S = 30.0


@dataclass
class Backoff:
    """When each service may be started again, from its crashes in a row (pure: the
    caller passes ``now``, epoch seconds)."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    stable_s: float = STABLE_S
    crashes: dict[str, int] = field(default_factory=dict)  #: in a row, by service
    not_before: dict[str, float] = field(default_factory=dict)

    def died(self, name: str, started_at: float, now: float) -> float:
        """Note a death of ``name`` (started at ``started_at``); returns the delay before
        it may be started again: none for a first crash, then doubling up to the cap."""
        crashes = 1 if now - started_at >= self.stable_s else self.crashes.get(name, 0) + 1
        self.crashes[name] = crashes
        delay = 0.0 if crashes == 1 else min(self.cap_s, self.base_s * 2 ** (crashes - 2))
        self.not_before[name] = now + delay
        return delay

    def due(self, name: str, now: float) -> bool:
        return now >= self.not_before.get(name, 0.0)


class Supervisor:
    """The loop of ``tokenmill supervise`` for the stack in ``settings.home``."""

    def __init__(
        self, settings: Settings, extra: Sequence[ServiceSpec] = (), *, poll_s: float = POLL_S
    ) -> None:
        """``extra``: services started with ``up(extra=...)`` (``tokenmill supervise``
        knows those of the registered factories only)."""
        self.settings = settings
        self.extra = tuple(extra)
        self.home = settings.home.resolve()
        self.poll_s = poll_s
        self.backoff = Backoff()
        self.stop = threading.Event()
        self._seen: dict[str, int] = {}  #: service → pid of the death already noted

    def run(self) -> None:
        """Watch until stopped (:attr:`stop`, SIGTERM/SIGINT) or the stack is gone."""
        log.info("supervisor.started", home=str(self.home), poll_s=self.poll_s)
        while not self.stop.is_set():
            current = state.load(self.home)
            if current is None and self._stack_gone():
                log.info("supervisor.stack_gone", home=str(self.home))
                return
            if current is not None:
                try:
                    self.check(current)
                except Exception:  # one bad round must not end supervision
                    log.exception("supervisor.round_failed")
            self.stop.wait(self.poll_s)
        log.info("supervisor.stopped")

    def check(self, current: StackState) -> None:
        """Restart what of ``current`` died and is due (one round)."""
        now = time.time()
        dead = [r for r in current.services if r.name != SUPERVISOR and not r.alive()]
        if not dead:
            return
        for record in dead:
            if self._seen.get(record.name) != record.pid:
                self._seen[record.name] = record.pid
                delay = self.backoff.died(record.name, record.started_at.timestamp(), now)
                log.warning(
                    "supervisor.service_died",
                    service=record.name,
                    pid=record.pid,
                    exit_code=processes.exit_code(record.pid),
                    restarts=record.restarts,
                    retry_in_s=delay,
                )
        due = [r for r in dead if self.backoff.due(r.name, now)]
        if not due:
            return
        full = any(r.name in HOLDS_DATA for r in dead)
        why = {
            r.name: (_reason(r, dead, full), processes.exit_code(r.pid), r.pid)
            for r in (dead if full else due)
        }
        deferred = {r.name for r in dead} - {r.name for r in due}
        try:
            result = manager.up(self.settings, self.extra, defer=deferred, revive_only=True)
        except StackError as exc:
            # It stays recorded as dead: counted as one more crash, retried after its backoff.
            log.error("supervisor.restart_failed", services=[r.name for r in due], error=str(exc))
            for record in due:
                self.backoff.died(record.name, now, time.time())
            return
        for record in result.state.services:
            if record.name in result.restarted:
                reason, code, old_pid = why.get(record.name, ("died", None, None))
                log.info(
                    "supervisor.restarted",
                    service=record.name,
                    reason=reason,
                    exit_code=code,
                    old_pid=old_pid,
                    pid=record.pid,
                    restarts=record.restarts,
                    crashes_in_a_row=self.backoff.crashes.get(record.name, 0),
                )

    def _stack_gone(self) -> bool:
        """No state file, confirmed under the lock (``up`` clears it for a moment during
        a full restart, holding the lock)."""
        try:
            with state.locked(self.home, timeout_s=5.0):
                return state.load(self.home) is None
        except StackError:
            return False  # someone holds the lock: look again next round

    def handle_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            # A restart under way is finished by `down` (it waits for the lock);
            # waiting for the lock ourselves must not keep SIGTERM waiting.
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


#: exit codes that say why a service ended on purpose (75, EX_TEMPFAIL: a scheduler that
#: lost its lease stepped down); such a service is restarted like any other
EXIT_REASONS = {75: "stepped down (lost its lease)"}


def _reason(record: ServiceRecord, dead: list[ServiceRecord], full: bool) -> str:
    if full and record.name not in HOLDS_DATA:
        lost = ", ".join(r.name for r in dead if r.name in HOLDS_DATA)
        return f"full restart: {lost} died"
    code = processes.exit_code(record.pid)
    if code is None:
        return "died"
    if code < 0:
        return f"killed by signal {-code}"
    return EXIT_REASONS.get(code, f"exited with code {code}")


def supervise(settings: Settings) -> None:
    """Run the supervisor for ``settings.home`` in this process until stopped."""
    # Readiness probes poll services over HTTP; httpx logs each request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    supervisor = Supervisor(settings)
    supervisor.handle_signals()
    supervisor.run()
