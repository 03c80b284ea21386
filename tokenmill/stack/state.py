"""The state file ``<home>/stack.json``: what ``tokenmill up`` started, where, and as
which process, so every other command (and ``down``) can find it.

Written atomically (temp file + ``os.replace``) after every service that starts, so a
crash half-way through ``up`` still leaves a file that ``down`` can clean up. External
URLs are never written here: they may carry passwords and live in the settings anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pydantic
import structlog
from pydantic import BaseModel, ConfigDict, Field

from ..errors import StackError
from . import processes
from .spec import StopStage

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
STATE_VERSION = 1

log = structlog.get_logger(__name__)


class ServiceRecord(BaseModel):
    """One child process started by ``up``."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int  #: also its process group id (each service starts its own session)
    #: process start time (:func:`process_create_time`), so a PID reused by another
    #: program after a reboot or crash is never taken for ours, nor killed
    create_time: float
    address: str  #: what clients connect to; "" for services without one
    probe: str  #: health check name in :data:`tokenmill.stack.health.PROBES`
    log: str
    depends_on: tuple[str, ...] = ()
    stop_timeout_s: float = 10.0
    stop_stage: StopStage = StopStage.processing
    #: the loopback port it was given, offered to it again when it is restarted
    port: int | None = None
    #: times ``up`` started it again after it had died
    restarts: int = 0
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def alive(self) -> bool:
        """The recorded process is still running (and is the same process)."""
        return processes.pid_alive(self.pid) and same_process(self.pid, self.create_time)


class StackState(BaseModel):
    """Everything ``up`` recorded."""

    model_config = ConfigDict(frozen=True)

    version: int = STATE_VERSION
    services: tuple[ServiceRecord, ...] = ()
    #: models asked for with ``tokenmill up --model``; the workers' service factory reads them
    models: tuple[str, ...] = ()
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def service(self, name: str) -> ServiceRecord | None:
        return next((s for s in self.services if s.name == name), None)

    def dead(self) -> list[ServiceRecord]:
        return [s for s in self.services if not s.alive()]


def process_create_time(pid: int) -> float:
    """When ``pid`` started: seconds since boot on Linux (``/proc/<pid>/stat``), else
    psutil's epoch time. psutil's adds the boot time, which moves whenever the wall clock
    is stepped (a VM syncing its clock): every service then looked like another program
    to the next process that checked, and the supervisor restarted a healthy stack."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            raise psutil.NoSuchProcess(pid) from None
        return float(psutil.Process(pid).create_time())
    # Fields after the command name (which may hold spaces and parentheses); the
    # start time is field 22 of proc(5), in clock ticks since boot.
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def same_process(pid: int, create_time: float) -> bool:
    try:
        return abs(process_create_time(pid) - create_time) < 0.5
    except (psutil.Error, OSError):
        return False


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def load(home: Path) -> StackState | None:
    """The recorded state, or None when nothing was started (or the file is unreadable,
    in which case it is moved aside to ``stack.json.corrupt`` and a warning logged)."""
    path = state_path(home)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = StackState.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        aside = path.with_suffix(".json.corrupt")
        os.replace(path, aside)
        log.warning("stack.state_unreadable", path=str(path), moved_to=str(aside), error=str(exc))
        return None
    if state.version > STATE_VERSION:
        raise StackError(f"{path} was written by a newer tokenmill (version {state.version})")
    return state


def save(home: Path, state: StackState) -> None:
    """Write ``state`` atomically: readers see the old file or the new one, never half."""
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stack.", suffix=".tmp", dir=home)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(state.model_dump_json(indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state_path(home))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def clear(home: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(home).unlink()


@contextlib.contextmanager
def locked(home: Path, *, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold ``<home>/stack.lock`` so two ``up``/``down`` never interleave.

    Raises:
        StackError: another ``up``/``down`` held it for longer than ``timeout_s``.
    """
    home.mkdir(parents=True, exist_ok=True)
    with (home / LOCK_FILE).open("a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"another `tokenmill up` or `down` holds {home / LOCK_FILE} "
                        f"(waited {timeout_s:.0f}s)"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
