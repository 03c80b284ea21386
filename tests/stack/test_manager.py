"""``manager.up/down/status`` in-process with real processes: external services,
extra services, failed starts, stale state, reused PIDs and leftover process groups."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from stack_helpers import all_dead, wait_for
from tokenmill.config.settings import Settings

from tokenmill.errors import StackError
from tokenmill.stack import (
    Launch,
    ServiceSpec,
    endpoints,
    health,
    manager,
    processes,
    register_factory,
    state,
)
from tokenmill.stack import spec as spec_module
from tokenmill.stack.state import ServiceRecord, StackState
from tokenmill.stack.status import check_stack

SettingsFactory = Callable[[], Settings]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture(autouse=True)
def no_registered_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the services a test names: another test of the session may have imported the
    CLI, whose modules register the stack's own services."""
    monkeypatch.setattr(spec_module, "_FACTORIES", [])


def test_external_services_are_used_not_started(
    settings: SettingsFactory,
    kafka_bootstrap: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", f"kafka://{kafka_bootstrap}")
    monkeypatch.setenv("TOKENMILL_REDIS_URL", redis_url)
    s = settings()

    result = manager.up(s)
    assert result.started == () and result.state.services == ()
    assert set(result.external) == {"kafka", "redis"}

    ep = endpoints(s)
    assert (ep.kafka_bootstrap, ep.redis_url) == (kafka_bootstrap, redis_url)
    assert ep.database_url == s.ledger_url
    report = check_stack(s)
    assert report.healthy, report.as_dict()
    assert not any(row.managed for row in report.services)

    assert manager.down(s) == []
    assert health.check("redis", redis_url) is None  # the external servers are untouched
    assert health.check("kafka", kafka_bootstrap) is None


def test_extra_services_start_after_their_dependencies_and_stop_first(
    settings: SettingsFactory, home: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_REDIS_URL", redis_url)  # mixed: external Redis, own broker
    s = settings()

    def argv(launch: Launch) -> list[str]:
        out = launch.data_dir / "env.json"
        return python(
            "import json, os, time\n"
            f"env = {{k: v for k, v in os.environ.items() if k.startswith('TOKENMILL_')}}\n"
            f"open({str(out)!r}, 'w').write(json.dumps(env))\n"
            "time.sleep(60)\n"
        )

    spec = ServiceSpec(
        name="echo-env",
        argv=argv,
        depends_on=("kafka", "redis"),
        start_timeout_s=10,
        ready=lambda launch: (launch.data_dir / "env.json").exists(),
    )
    result = manager.up(s, [spec], models=["sim"])
    assert result.started == ("kafka", "echo-env")
    kafka = result.state.service("kafka")
    assert kafka is not None
    env = json.loads((home / "data" / "echo-env" / "env.json").read_text())
    assert env["TOKENMILL_KAFKA_URL"] == kafka.address
    assert env["TOKENMILL_REDIS_URL"] == redis_url
    assert env["TOKENMILL_HOME"] == str(home.resolve())

    again = manager.up(s, [spec], models=["other"])
    assert again.started == () and set(again.already_running) == {"kafka", "echo-env"}
    assert again.state.models == ("sim", "other")
    assert check_stack(s).healthy

    pids = [r.pid for r in again.state.services]
    assert manager.down(s) == ["echo-env", "kafka"]
    assert all_dead(pids)


def test_a_preferred_port_is_used_when_free_and_kept_when_redis_restarts_everything(
    settings: SettingsFactory, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", kafka_bootstrap)  # Redis embedded: killable
    preferred, taken = processes.free_port(), socket.create_server(("127.0.0.1", 0))

    def listener(name: str, port: int) -> ServiceSpec:
        return ServiceSpec(name=name, argv=lambda launch: python("import time; time.sleep(60)"),
                           address=lambda launch: f"127.0.0.1:{launch.port}", preferred_port=port,
                           depends_on=("redis",))

    specs = [listener("gets-it", preferred), listener("finds-it-taken", taken.getsockname()[1])]
    with taken:
        first = manager.up(settings(), specs).state
        ports = {r.name: r.port for r in first.services}
        assert ports["gets-it"] == preferred and ports["finds-it-taken"] != taken.getsockname()[1]
        redis = first.service("redis")
        assert redis is not None
        os.killpg(redis.pid, signal.SIGKILL)
        assert wait_for(lambda: all_dead([redis.pid]), 5)
        again = manager.up(settings(), specs)  # a lost Redis: every service starts afresh
    assert set(again.restarted) >= {"gets-it", "finds-it-taken"}
    assert {r.name: r.port for r in again.state.services if r.name in ports} == ports


def test_down_leaves_no_process_of_a_group_behind(
    settings: SettingsFactory,
    home: Path,
    kafka_bootstrap: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", kafka_bootstrap)
    monkeypatch.setenv("TOKENMILL_REDIS_URL", redis_url)
    child_pid = home / "child.pid"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    spec = ServiceSpec(
        name="parent",
        argv=lambda launch: python(
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', {stubborn!r}])\n"
            f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n"
        ),
        ready=lambda launch: child_pid.exists() and child_pid.read_text() != "",
        stop_timeout_s=1.0,
    )
    result = manager.up(settings(), [spec])
    grandchild = int(child_pid.read_text())
    assert processes.pid_alive(grandchild)

    assert manager.down(settings()) == ["parent"]
    assert all_dead([result.state.services[0].pid, grandchild])


def test_failed_start_raises_and_stops_what_it_started(
    settings: SettingsFactory, home: Path
) -> None:
    seen: list[int] = []

    def argv(launch: Launch) -> list[str]:
        recorded = state.load(home)  # written after each service, so visible by now
        seen.extend(r.pid for r in recorded.services) if recorded else None
        return python("import sys; print('boom: bad model'); sys.exit(3)")

    broken = ServiceSpec(name="broken", argv=argv, depends_on=("kafka", "redis"))
    with pytest.raises(StackError, match=r"broken exited with code 3(.|\n)*boom: bad model"):
        manager.up(settings(), [broken])
    assert len(seen) == 2 and wait_for(lambda: all_dead(seen), 5)
    assert state.load(home) is None
    with pytest.raises(StackError, match="tokenmill up"):
        endpoints(settings())


def test_service_never_ready_times_out_and_is_stopped(
    settings: SettingsFactory,
    home: Path,
    kafka_bootstrap: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", kafka_bootstrap)
    monkeypatch.setenv("TOKENMILL_REDIS_URL", redis_url)
    pid_file = home / "slow.pid"
    slow = ServiceSpec(
        name="slow",
        argv=lambda launch: python(
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        ),
        ready=lambda launch: False,
        start_timeout_s=0.5,
        stop_timeout_s=1.0,
    )
    with pytest.raises(StackError, match="slow not ready"):
        manager.up(settings(), [slow])
    assert wait_for(pid_file.exists, 2)
    assert all_dead([int(pid_file.read_text())])
    assert state.load(home) is None


def test_bad_dependency_fails_before_starting_anything(
    settings: SettingsFactory, home: Path
) -> None:
    spec = ServiceSpec(name="lonely", argv=lambda launch: python("pass"), depends_on=("nope",))
    with pytest.raises(StackError, match="unknown service 'nope'"):
        manager.up(settings(), [spec])
    assert state.load(home) is None


def _record(name: str, pid: int, create_time: float) -> ServiceRecord:
    return ServiceRecord(
        name=name,
        pid=pid,
        create_time=create_time,
        address="",
        probe="pid",
        log="x.log",
        stop_timeout_s=1.0,
    )


def _dead_pid() -> int:
    proc = subprocess.Popen(python("pass"))
    proc.wait(5)
    return proc.pid


def test_stale_state_is_detected_and_recovered(
    settings: SettingsFactory, home: Path, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    survivor = sleeper()
    stale = StackState(
        services=(
            _record("kafka", _dead_pid(), 1.0),
            _record("orphan", survivor.pid, state.process_create_time(survivor.pid)),
        ),
        models=("sim",),
    )
    state.save(home, stale)
    s = settings()

    with pytest.raises(StackError, match=r"kafka \(pid \d+\) is not running.*tokenmill up"):
        endpoints(s)
    report = check_stack(s)
    assert not report.healthy
    assert {r.name for r in report.services if not r.healthy} == {"kafka", "redis"}

    result = manager.up(s)
    assert result.started == ("kafka", "redis")
    assert result.state.models == ("sim",)
    assert wait_for(lambda: survivor.poll() is not None, 5)  # the survivor was stopped
    assert check_stack(s).healthy
    endpoints(s)


def test_a_reused_pid_is_never_killed(
    settings: SettingsFactory, home: Path, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    stranger = sleeper()
    # Same PID, other start time: another program got the PID after ours died.
    state.save(home, StackState(services=(_record("worker", stranger.pid, 1.0),)))
    assert manager.down(settings()) == []
    assert stranger.poll() is None
    assert not state.state_path(home).exists()


def test_secrets_stay_out_of_status_and_errors(
    settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"redis://:s3cret@127.0.0.1:{processes.free_port()}/0"
    monkeypatch.setenv("TOKENMILL_REDIS_URL", dead)
    monkeypatch.setenv("TOKENMILL_DATABASE_URL", "postgresql://u:s3cret@127.0.0.1:1/db")
    s = settings()
    report = check_stack(s, timeout_s=0.5)
    dumped = json.dumps(report.as_dict())
    assert "s3cret" not in dumped and "***" in dumped
    with pytest.raises(StackError) as err:
        manager.up(s, external_timeout_s=0.5)
    assert "s3cret" not in str(err.value)
    assert "s3cret" not in repr(endpoints(s.model_copy(update={"kafka_url": "h:1"})))


def test_registered_factories_get_the_models(
    settings: SettingsFactory,
    kafka_bootstrap: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", kafka_bootstrap)
    monkeypatch.setenv("TOKENMILL_REDIS_URL", redis_url)
    def workers(s: Settings, models: Sequence[str]) -> list[ServiceSpec]:
        return [
            ServiceSpec(
                name=f"worker-{m}",
                argv=lambda launch: python("import time; time.sleep(60)"),
                depends_on=("kafka", "redis"),
            )
            for m in models
        ]

    register_factory(workers)
    register_factory(workers)  # twice is once
    assert manager.up(settings(), models=["sim"]).started == ("worker-sim",)
    assert manager.up(settings(), models=["tiny"]).started == ("worker-tiny",)
    assert manager.down(settings()) == ["worker-tiny", "worker-sim"]


def test_a_stepped_wall_clock_leaves_a_running_service_itself(
    sleeper: Callable[[], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boot time psutil adds moves when a VM's clock is stepped; a service recorded
    before the step must still be recognised after it (else the supervisor restarts
    a healthy stack and `down` leaves it running)."""
    import psutil._pslinux as pslinux

    proc = sleeper()
    recorded = state.process_create_time(proc.pid)
    booted = pslinux.boot_time()
    monkeypatch.setattr(pslinux, "boot_time", lambda: booted + 2.0)
    assert state.same_process(proc.pid, recorded)
    proc.kill()
    proc.wait(5)
    assert not state.same_process(proc.pid, recorded)
