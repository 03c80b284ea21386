"""What ``up`` and ``down`` do to a running stack, with a real embedded broker and Redis:
``down`` stops stage by stage (intake, workers, draining stream processors, then the
broker and Redis), ``up`` restarts only a dead service (keeping the broker's topics), and
a dead Redis restarts everything with its data reloaded from the append-only file."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from stack_helpers import all_dead, consume, produce, wait_for
from tokenmill.config.settings import Settings

from tokenmill.stack import Launch, ServiceSpec, endpoints, manager, processes, state
from tokenmill.stack import spec as spec_module
from tokenmill.stack.spec import DRAIN_STOP_TIMEOUT_S, StopStage
from tokenmill.stack.status import check_stack

SettingsFactory = Callable[[], Settings]

# A service that, on SIGTERM, takes `delay` seconds (as a draining service would), then
# notes when it exited and whether the broker and Redis still answered at that moment.
_SERVICE = """
import os, signal, socket, sys, time
marks, name, delay, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

def reachable(address):
    host, port = address.split("//")[-1].split("/")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return 1
    except OSError:
        return 0

def bye(*_):
    time.sleep(delay)
    kafka = reachable(os.environ["TOKENMILL_KAFKA_URL"])
    redis = reachable(os.environ["TOKENMILL_REDIS_URL"])
    with open(marks, "a") as fh:
        fh.write(f"{name} {time.time()} {kafka} {redis}\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, bye)
open(ready, "w").close()
while True:
    time.sleep(1)
"""


@pytest.fixture(autouse=True)
def only_these_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own stand-ins, not the services a CLI import may have registered."""
    monkeypatch.setattr(spec_module, "_FACTORIES", [])


def service(
    name: str,
    marks: Path,
    *,
    stage: StopStage = StopStage.processing,
    delay: float = 0.0,
    stop_timeout_s: float = 10.0,
) -> ServiceSpec:
    def argv(launch: Launch) -> list[str]:
        ready = launch.data_dir / "ready"
        ready.unlink(missing_ok=True)
        return [sys.executable, "-c", _SERVICE, str(marks), name, str(delay), str(ready)]

    return ServiceSpec(
        name=name,
        argv=argv,
        ready=lambda launch: (launch.data_dir / "ready").exists(),
        depends_on=("kafka", "redis"),
        stop_stage=stage,
        stop_timeout_s=stop_timeout_s,
        start_timeout_s=20.0,
    )


def exits(marks: Path) -> dict[str, tuple[float, bool, bool]]:
    found = {}
    for line in marks.read_text().splitlines():
        name, at, kafka, redis_up = line.split()
        found[name] = (float(at), kafka == "1", redis_up == "1")
    return found


def test_down_stops_intake_then_workers_then_drained_streams_then_infrastructure(
    settings: SettingsFactory, home: Path
) -> None:
    marks = home / "exits.txt"
    specs = [
        # started in this order; the old reverse-start-order `down` stopped `streams` first
        service("gateway", marks, stage=StopStage.intake, delay=0.6),
        service("intake-b", marks, stage=StopStage.intake, delay=0.6),
        service("worker", marks),  # processing, the default
        # a 2 s drain with a 1 s stop timeout asked for: the drain stage's floor wins
        service("streams", marks, stage=StopStage.drain, delay=2.0, stop_timeout_s=1.0),
    ]
    result = manager.up(settings(), specs)
    recorded = {r.name: r for r in result.state.services}
    assert recorded["streams"].stop_timeout_s == DRAIN_STOP_TIMEOUT_S
    assert recorded["gateway"].stop_stage is StopStage.intake
    assert recorded["kafka"].stop_stage is StopStage.infrastructure
    pids = [r.pid for r in result.state.services]

    stopped = manager.down(settings())

    assert set(stopped[:2]) == {"gateway", "intake-b"}
    assert stopped[2:4] == ["worker", "streams"]
    assert set(stopped[4:]) == {"kafka", "redis"}
    assert all_dead(pids)
    at = exits(marks)
    assert set(at) == {"gateway", "intake-b", "worker", "streams"}  # none was SIGKILLed
    assert max(at["gateway"][0], at["intake-b"][0]) < at["worker"][0] < at["streams"][0]
    # the stream processor drained with the broker and Redis still there
    assert at["streams"][1:] == (True, True)


def _pids(s: Settings) -> dict[str, int]:
    recorded = state.load(s.home.resolve())
    assert recorded is not None
    return {r.name: r.pid for r in recorded.services}


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not processes.pid_alive(pid), 5)


def test_up_restarts_only_the_dead_service_and_the_broker_keeps_its_topics(
    settings: SettingsFactory, home: Path
) -> None:
    marks = home / "exits.txt"
    specs = [service("scheduler", marks), service("worker", marks)]
    s = settings()
    manager.up(s, specs)
    ep = endpoints(s)
    topic = f"kept-{uuid.uuid4().hex[:8]}"
    asyncio.run(produce(ep.kafka_bootstrap, topic, [b"a", b"b", b"c"]))
    before = _pids(s)

    _kill(before["scheduler"])
    report = check_stack(s)
    assert [r.name for r in report.services if not r.healthy] == ["scheduler"]

    again = manager.up(s, specs)
    assert again.restarted == again.started == ("scheduler",)
    after = _pids(s)
    assert after["scheduler"] != before["scheduler"] and processes.pid_alive(after["scheduler"])
    assert {n: p for n, p in after.items() if n != "scheduler"} == {
        n: p for n, p in before.items() if n != "scheduler"
    }
    assert sorted(asyncio.run(consume(ep.kafka_bootstrap, topic, 3))) == [b"a", b"b", b"c"]
    restarts = {r.name: r.restarts for r in check_stack(s).services if r.managed}
    assert restarts == {"kafka": 0, "redis": 0, "scheduler": 1, "worker": 0}

    _kill(after["scheduler"])
    assert manager.up(s, specs).restarted == ("scheduler",)
    assert {r.name: r.restarts for r in check_stack(s).services}["scheduler"] == 2
    assert check_stack(s).healthy


def test_redis_killed_restarts_everything_and_reloads_its_data(
    settings: SettingsFactory, home: Path
) -> None:
    marks = home / "exits.txt"
    specs = [service("worker", marks)]
    s = settings()
    manager.up(s, specs)
    url = endpoints(s).redis_url
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.mset({f"result:{i}": f"v{i}" for i in range(1000)})
    client.xadd("tokenmill:done:t", {"id": "r-1"})
    # everysec may hold the AOF write back while a slow fsync runs (up to 2 s): what a
    # kill keeps is what reached the file, so kill once the buffer is empty.
    assert wait_for(lambda: client.info("persistence")["aof_buffer_length"] == 0, 10)
    client.close()
    before = _pids(s)

    _kill(before["redis"])
    again = manager.up(s, specs)

    # Its clients lost their connections and addresses: everything came back.
    assert set(again.restarted) == {"kafka", "redis", "worker"}
    after = _pids(s)
    assert all(after[n] != before[n] for n in before) and all_dead(list(before.values()))
    assert endpoints(s).redis_url == url  # on its old port again: clients just reconnect
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert client.mget([f"result:{i}" for i in range(1000)]) == [
            f"v{i}".encode() for i in range(1000)
        ]
        assert client.xlen("tokenmill:done:t") == 1
    finally:
        client.close()

    # And across down/up: the append-only file stays in the state directory.
    manager.down(s)
    assert list((home / "data" / "redis").rglob("*.aof"))
    manager.up(s, specs)
    client = redis.Redis.from_url(endpoints(s).redis_url, socket_timeout=5)
    try:
        assert client.get("result:999") == b"v999"
    finally:
        client.close()


def test_the_projects_services_declare_their_stop_stage() -> None:
    """Intake (gateway, batch runner, scheduler) stops first, the stream processors last:
    each factory says so where the service is defined."""
    from tokenmill.config.settings import load_settings
    from tokenmill.gateway.commands import gateway_services
    from tokenmill.ledger.commands import streams_services
    from tokenmill.producers.batch_commands import batch_services
    from tokenmill.scheduler.commands import scheduler_services

    settings = load_settings()
    specs = [s for f in (gateway_services, scheduler_services, batch_services, streams_services)
             for s in f(settings, ())]
    assert {s.name: s.stop_stage for s in specs} == {
        "gateway": StopStage.intake, "scheduler": StopStage.intake, "batch-runner": StopStage.intake,
        "webhooks": StopStage.processing, "streams": StopStage.drain,
    }
