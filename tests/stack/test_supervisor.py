"""The supervisor, ``tokenmill restart`` and ``status``'s degraded rows and copies, with
a real embedded broker and Redis and stand-in services (quick); the real services of
``tokenmill up`` under the real ``tokenmill supervise`` are test_supervised_stack.py's."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
from stack_helpers import wait_for
from tokenmill.config.settings import Settings

from tokenmill import presence
from tokenmill.errors import StackError
from tokenmill.stack import Launch, ServiceSpec, manager, processes, state
from tokenmill.stack import spec as spec_module
from tokenmill.stack.commands import status_table
from tokenmill.stack.status import check_stack
from tokenmill.stack.supervisor import Backoff, Supervisor

SettingsFactory = Callable[[], Settings]

_SLEEPER = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(600)"


@pytest.fixture(autouse=True)
def only_these_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own stand-ins, not the services a CLI import may have registered."""
    monkeypatch.setattr(spec_module, "_FACTORIES", [])


def stand_in(name: str) -> ServiceSpec:
    """A service that is ready once it wrote its ready file, and needs the broker and Redis."""

    def argv(launch: Launch) -> list[str]:
        ready = launch.data_dir / "ready"
        ready.unlink(missing_ok=True)
        return [sys.executable, "-c", _SLEEPER, str(ready)]

    return ServiceSpec(
        name=name,
        argv=argv,
        ready=lambda launch: (launch.data_dir / "ready").exists(),
        depends_on=("kafka", "redis"),
        start_timeout_s=20.0,
    )


SPECS = [stand_in("scheduler"), stand_in("worker")]


def _records(s: Settings) -> dict[str, state.ServiceRecord]:
    recorded = state.load(s.home.resolve())
    assert recorded is not None
    return {r.name: r for r in recorded.services}


def _kill(pid: int) -> float:
    """SIGKILL ``pid``'s process group and wait until it is gone; returns when it was
    killed (monotonic): the supervisor may notice the death before this test does."""
    killed = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    assert wait_for(lambda: not processes.pid_alive(pid), 5)
    return killed


def _replaced(s: Settings, name: str, old_pid: int) -> Callable[[], bool]:
    def check() -> bool:
        record = _records(s).get(name)
        return record is not None and record.pid != old_pid and record.alive()

    return check


@pytest.fixture
def supervised(settings: SettingsFactory) -> Iterator[Supervisor]:
    """The stand-ins up, and the supervisor's loop watching them in a thread."""
    s = settings()
    manager.up(s, SPECS)
    supervisor = Supervisor(s, SPECS, poll_s=0.1)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    yield supervisor
    supervisor.stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_backoff_doubles_on_crashes_in_a_row_up_to_a_cap_and_resets_once_stable() -> None:
    b = Backoff(base_s=1.0, cap_s=8.0, stable_s=30.0)
    delays = [b.died("s", started_at=100.0 + i, now=101.0 + i) for i in range(7)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not b.due("s", now=107.0) and b.due("s", now=115.0)
    assert b.died("s", started_at=200.0, now=260.0) == 0.0  # it had stayed up 60 s
    assert b.died("other", started_at=0.0, now=1.0) == 0.0  # counted per service


def test_a_dead_service_is_restarted_alone_and_repeated_crashes_back_off(
    settings: SettingsFactory, supervised: Supervisor
) -> None:
    s = settings()
    before = _records(s)

    _kill(before["worker"].pid)
    assert wait_for(_replaced(s, "worker", before["worker"].pid), 10)
    after = _records(s)
    assert after["worker"].restarts == 1 and after["worker"].port == before["worker"].port
    assert {n: r.pid for n, r in after.items() if n != "worker"} == {
        n: r.pid for n, r in before.items() if n != "worker"
    }
    assert {r.name: r.restarts for r in check_stack(s).services if r.managed}["worker"] == 1

    # Dying again at once is a crash in a row: the next start waits its backoff (1 s).
    died = _kill(after["worker"].pid)
    assert wait_for(_replaced(s, "worker", after["worker"].pid), 10)
    assert time.monotonic() - died >= 0.9
    assert _records(s)["worker"].restarts == 2
    # The supervisor was its parent: it knows how it ended.
    assert processes.exit_code(after["worker"].pid) == -signal.SIGKILL


def test_a_dead_broker_restarts_everything_and_status_shows_its_dependents_degraded(
    settings: SettingsFactory,
) -> None:
    s = settings()
    manager.up(s, SPECS)
    before = _records(s)

    _kill(before["kafka"].pid)
    rows = {r.name: r for r in check_stack(s).services}
    assert rows["kafka"].state == "down"
    for name in ("scheduler", "worker"):
        assert rows[name].state == "degraded" and not rows[name].healthy
        assert rows[name].detail == "degraded: kafka unreachable"
    assert rows["redis"].state == "ok"
    assert "degraded" in _render(check_stack(s))

    # The supervisor's round: the clean full restart, everything on a new process.
    Supervisor(s, SPECS).check(state.load(s.home.resolve()) or pytest.fail("no state"))
    after = _records(s)
    assert all(after[n].pid != before[n].pid and after[n].alive() for n in before)
    assert all(r.state == "ok" for r in check_stack(s).services), check_stack(s).as_dict()


def test_restart_replaces_one_service_on_its_port_and_names_the_known_ones(
    settings: SettingsFactory,
) -> None:
    s = settings()
    manager.up(s, SPECS)
    before = _records(s)

    result = manager.restart(s, "scheduler", SPECS)
    assert result.restarted == ("scheduler",)
    after = _records(s)
    assert after["scheduler"].pid != before["scheduler"].pid and after["scheduler"].alive()
    assert after["scheduler"].port == before["scheduler"].port
    assert after["scheduler"].restarts == 1
    assert not processes.pid_alive(before["scheduler"].pid)
    assert {n: r.pid for n, r in after.items() if n != "scheduler"} == {
        n: r.pid for n, r in before.items() if n != "scheduler"
    }

    with pytest.raises(
        StackError, match="no service 'sheduler'.*known: kafka, redis, scheduler, worker"
    ):
        manager.restart(s, "sheduler", SPECS)


def test_status_lists_every_live_copy_its_role_and_lag(settings: SettingsFactory) -> None:
    s = settings()
    manager.up(s, SPECS)
    records = _records(s)
    host = socket.gethostname()

    async def announce() -> None:
        client = aredis.Redis.from_url(records["redis"].address)
        try:
            # the recorded scheduler (active), a standby on another machine, and a
            # stream processor started by hand (`up` knows nothing of it)
            await presence.announce(
                client,
                "scheduler",
                role="active",
                detail={"lag": 0},
                instance=f"{host}:{records['scheduler'].pid}",
            )
            await presence.announce(
                client, "scheduler", role="standby", detail={"lag": 7}, instance="other-host:4242"
            )
            await presence.announce(
                client, "streams", role="copy", detail={"lag": 3}, instance=f"{host}:999999"
            )
        finally:
            await client.aclose()

    asyncio.run(announce())
    report = check_stack(s)
    rows = {r["name"]: r for r in report.as_dict()["services"]}
    copies = {c["instance"]: c for c in rows["scheduler"]["copies"]}
    assert copies[f"{host}:{records['scheduler'].pid}"]["role"] == "active"
    assert copies[f"{host}:{records['scheduler'].pid}"]["managed"] is True
    assert copies["other-host:4242"] == {
        **copies["other-host:4242"],
        "role": "standby",
        "managed": False,
        "pid": None,
        "detail": {"lag": 7},
    }
    assert rows["streams"]["managed"] is False and rows["streams"]["state"] == "ok"
    assert [c["detail"] for c in rows["streams"]["copies"]] == [{"lag": 3}]
    assert not rows["worker"]["copies"]
    text = _render(report)
    assert "standby" in text and "lag=7" in text and "other-host:4242" in text


def _render(report: object) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(status_table(report))  # type: ignore[arg-type]
    return console.export_text()


def test_supervisor_exits_once_the_stack_is_down(settings: SettingsFactory, home: Path) -> None:
    s = settings()
    manager.up(s, SPECS)
    supervisor = Supervisor(s, SPECS, poll_s=0.05)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    manager.down(s)
    thread.join(10)
    assert not thread.is_alive()  # it did not bring anything back, and it ended
    assert state.load(home) is None


def test_an_exit_code_of_a_child_names_the_reason_a_fenced_one_included() -> None:
    from datetime import UTC, datetime

    from tokenmill.stack.supervisor import _reason

    reasons = {}
    for code in (75, 3):
        proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        assert wait_for(lambda p=proc: not processes.pid_alive(p.pid), 10)
        record = state.ServiceRecord(
            name="scheduler",
            pid=proc.pid,
            create_time=0.0,
            address="",
            probe="pid",
            log="",
            started_at=datetime.now(UTC),
        )
        reasons[code] = _reason(record, [record], full=False)
        proc.wait(5)  # already reaped by pid_alive: only settles the Popen object
    assert reasons == {75: "stepped down (lost its lease)", 3: "exited with code 3"}
