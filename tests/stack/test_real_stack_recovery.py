"""The real services of ``tokenmill up --no-supervise`` (scheduler, stream processors,
workers, gateway …) through the CLI: SIGKILLed services come back alone on ``up`` while the rest — and
the broker's topics — stay, the stack still serves, and ``down`` stops stage by stage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

from stack_helpers import all_dead, consume, produce, tokenmill, wait_for

from tokenmill.stack import processes, state
from tokenmill.stack.spec import StopStage

KILLED = ("scheduler", "streams")


def test_killed_services_restart_alone_and_down_stops_in_stages(home: Path) -> None:
    # Without the supervisor: this is `up`'s own recovery (test_supervised_stack.py has
    # the supervisor's, which would restart them before `up` could).
    first = tokenmill("up", "--no-supervise", timeout_s=180)
    assert first.returncode == 0, first.stderr
    recorded = state.load(home)
    assert recorded is not None
    before = {s.name: s.pid for s in recorded.services}
    assert set(KILLED) <= set(before)
    kafka = recorded.service("kafka")
    assert kafka is not None
    topic = f"kept-{uuid.uuid4().hex[:8]}"
    asyncio.run(produce(kafka.address, topic, [b"1", b"2", b"3"]))

    for name in KILLED:
        os.kill(before[name], signal.SIGKILL)
    assert wait_for(lambda: all_dead([before[n] for n in KILLED]), 5)

    again = tokenmill("up", "--no-supervise", timeout_s=180)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("restarted (1)") == len(KILLED), again.stdout
    after = {s.name: s.pid for s in (state.load(home) or recorded).services}
    assert {n: p for n, p in after.items() if n not in KILLED} == {
        n: p for n, p in before.items() if n not in KILLED
    }
    assert all(processes.pid_alive(after[n]) and after[n] != before[n] for n in KILLED)
    # the broker was left alone: what it held is still there
    assert sorted(asyncio.run(consume(kafka.address, topic, 3))) == [b"1", b"2", b"3"]

    status = tokenmill("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    restarts = {s["name"]: s["restarts"] for s in json.loads(status.stdout)["services"]}
    assert {n: restarts[n] for n in KILLED} == {n: 1 for n in KILLED}
    assert restarts["kafka"] == restarts["redis"] == restarts["gateway"] == 0
    # the restarted scheduler dispatches: a request goes all the way through
    served = tokenmill("submit", "hello", "--tenant", "alpha", "--max-tokens", "3")
    assert served.returncode == 0 and "3 completion tokens" in served.stdout, served.stderr

    stages = {s.name: s.stop_stage for s in (state.load(home) or recorded).services}
    down = tokenmill("down", timeout_s=180)
    assert down.returncode == 0, down.stderr
    order = down.stdout.split("stopped:", 1)[1].replace("\n", " ").split(",")
    order = [name.strip() for name in order]
    assert set(order) == set(after)
    assert [stages[n] for n in order] == sorted(stages[n] for n in order), order
    assert {n for n in order if stages[n] is StopStage.intake} >= {"gateway", "scheduler"}
    assert stages["streams"] is StopStage.drain and order[-2:] in (
        ["redis", "kafka"],
        ["kafka", "redis"],
    )
    assert all_dead(list(after.values()))
