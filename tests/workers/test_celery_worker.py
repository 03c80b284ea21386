"""Real worker processes (simulated engine) on a real Redis broker and Kafka:
slices through Celery, SIGKILL redelivery, long requests, Flower."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from tokenmill.workers import keys
from tokenmill.workers.celery_app import create_app, queue_name, send_slice
from tokenmill.workers.heartbeat import live_workers
from tokenmill.workers.results import wait_result
from workers_helpers import (
    WorkerProcess,
    chat_request,
    collect_events,
    dispatches,
    wait_for,
    write_config,
)

from tokenmill.stack import processes
from tokenmill.wire import EventKind, ResultStatus

MODELS = {
    "sim": {"engine": "sim", "max_in_flight": 64, "interactive_headroom": 2,
            "engine_args": {"decode_ms_per_step": 2.0}},
    # ~50 ms per token: a 60-token request runs ~3 s
    "slow": {"engine": "sim", "max_in_flight": 8, "engine_args": {"decode_ms_per_step": 50.0}},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> dict:
    root = tmp_path_factory.mktemp("workers")
    config = write_config(root / "tokenmill.toml", root / "home", MODELS)
    return {"config": config, "redis_url": redis_url, "kafka": kafka_bootstrap, "logs": root}


def start_worker(stack: dict, model: str, *args: str) -> WorkerProcess:
    worker = WorkerProcess(
        model, config=stack["config"], redis_url=stack["redis_url"], kafka=stack["kafka"],
        log_dir=stack["logs"], extra_args=args,
    )
    worker.wait_ready(60)
    worker.wait_consuming(30)
    return worker


@pytest.fixture(scope="module")
def sim_worker(stack: dict) -> Iterator[WorkerProcess]:
    worker = start_worker(stack, "sim")
    yield worker
    worker.stop()


@pytest.fixture
def app(stack: dict):
    return create_app(stack["redis_url"])


def test_worker_runs_slices_and_reports_events(
    stack: dict, sim_worker: WorkerProcess, app, rclient: redis.Redis
) -> None:
    name = sim_worker.name()
    assert name is not None and name.startswith("sim.simulated@sim@")
    # the headroom slots are the engine's, reserved for interactive requests, with a
    # task thread each
    [beat] = [b for b in live_workers(rclient, "sim") if b.worker == name]
    assert (beat.capacity, beat.reserved, beat.engine_running, beat.preemptions) == (66, 2, 0, 0)
    assert b"concurrency: 66 (thread)" in sim_worker.log_path.read_bytes()
    reqs = [chat_request("sim", f"hello {i}", max_tokens=40) for i in range(6)]
    send_slice(app, "sim", dispatches(reqs[:4]))
    send_slice(app, "sim", dispatches(reqs[4:]))
    for req in reqs:
        result = wait_result(rclient, req.id, timeout_s=20)
        assert result is not None and result.status is ResultStatus.succeeded
        assert result.worker == name and result.usage is not None
    events = collect_events(stack["kafka"], [r.id for r in reqs], timeout_s=20)
    for req in reqs:
        evs = sorted((e for e in events if e.request_id == req.id), key=lambda e: e.seq)
        assert evs[0].kind is EventKind.dispatched and evs[1].kind is EventKind.first_token
        assert [e.kind for e in evs].count(EventKind.finished) == 1
        assert evs[-1].kind is EventKind.finished and evs[-1].completion_tokens == 40
        assert sum(e.delta_tokens for e in evs) == 40
        assert all(e.simulated and e.worker == name and e.tenant == "acme" for e in evs)


def test_sigkill_mid_request_completes_on_another_worker_once(
    stack: dict, app, rclient: redis.Redis
) -> None:
    opts = ("--visibility-timeout", "2", "--lease-ttl", "2")
    first = start_worker(stack, "slow", *opts)
    try:
        first_name = first.name()
        req = chat_request("slow", max_tokens=60)
        send_slice(app, "slow", dispatches([req]))
        wait_for(lambda: rclient.get(keys.lease(req.id)) == first_name.encode(), 10, "first worker runs it")
        time.sleep(0.3)  # mid-request
        first.kill()
    finally:
        first.stop()
    assert rclient.get(keys.result(req.id)) is None
    second = start_worker(stack, "slow", *opts)
    try:
        second_name = second.name()
        result = wait_result(rclient, req.id, timeout_s=30)
        assert result is not None and result.status is ResultStatus.succeeded, second.log()
        assert result.worker == second_name
        events = collect_events(stack["kafka"], [req.id], timeout_s=20, settle_s=1.0)
        finished = [e for e in events if e.kind is EventKind.finished]
        assert len(finished) == 1 and finished[0].worker == second_name and finished[0].attempt == 2
        assert finished[0].completion_tokens == 60
        dispatched = sorted((e.attempt, e.worker) for e in events if e.kind is EventKind.dispatched)
        assert dispatched == [(1, first_name), (2, second_name)]
        # the message was acked: nothing left on the queue or unacked
        assert rclient.llen(queue_name("slow")) == 0 and rclient.hlen("unacked") == 0
    finally:
        second.stop()


def test_request_longer_than_visibility_timeout_runs_once(
    stack: dict, app, rclient: redis.Redis
) -> None:
    opts = ("--visibility-timeout", "1", "--lease-ttl", "2")
    workers = [start_worker(stack, "slow", *opts) for _ in range(2)]
    try:
        req = chat_request("slow", max_tokens=80)  # ~4 s, four visibility timeouts
        task_id = send_slice(app, "slow", dispatches([req]))
        result = wait_result(rclient, req.id, timeout_s=30)
        assert result is not None and result.status is ResultStatus.succeeded
        events = collect_events(stack["kafka"], [req.id], timeout_s=20, settle_s=2.5)
        # the running worker renewed the message's visibility: it was delivered once
        deliveries = sum(w.log_path.read_text().count(f"[{task_id}] received") for w in workers)
        assert deliveries == 1
        assert [e.kind for e in events].count(EventKind.dispatched) == 1
        # one terminal event (a redelivered finished request's is sent again, identical)
        assert len({e.event_id for e in events if e.kind is EventKind.finished}) == 1
        assert {e.attempt for e in events} == {1}
    finally:
        for w in workers:
            w.stop()


def test_flower_lists_the_running_worker(stack: dict, sim_worker: WorkerProcess) -> None:
    port = processes.free_port()
    env = {
        **os.environ,
        "TOKENMILL_CONFIG": str(stack["config"]),
        "TOKENMILL_REDIS_URL": stack["redis_url"],
        "TOKENMILL_KAFKA_URL": stack["kafka"],
        "TOKENMILL_FLOWER_BASIC_AUTH": "tester:flower-test-password",
    }
    auth = ("tester", "flower-test-password")
    log = Path(stack["logs"]) / "flower.log"
    with log.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.workers.commands", "flower", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        name = sim_worker.name()

        def listed() -> dict | None:
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"},
                                auth=auth, timeout=5)  # fmt: skip
            except httpx.HTTPError:
                return None
            return got.json() if got.status_code == 200 and name in got.json() else None

        workers = wait_for(listed, 45, "flower lists the worker", alive=lambda: flower.poll() is None)
        info = workers[name]
        assert "tokenmill.pool.sim" in str(info.get("active_queues"))
        assert "tokenmill.run_slice" in str(info.get("registered"))

        # the worker sends task events: Flower sees the task run
        task_id = send_slice(create_app(stack["redis_url"]), "sim", dispatches([chat_request("sim")]))

        def task_seen() -> dict | None:
            got = httpx.get(f"http://127.0.0.1:{port}/api/task/info/{task_id}", auth=auth, timeout=5)
            return got.json() if got.status_code == 200 and got.json().get("state") == "SUCCESS" else None

        task = wait_for(task_seen, 20, "flower sees the task succeed")
        assert task["worker"] == name and task["name"] == "tokenmill.run_slice"
        assert httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=5).status_code == 401
    finally:
        processes.stop_pid(flower.pid)


def test_a_malformed_dispatch_fails_alone_and_the_rest_of_its_slice_runs(
    stack: dict, sim_worker: WorkerProcess, app, rclient: redis.Redis
) -> None:
    import json

    from tokenmill.workers.celery_app import send_slice_json

    good = chat_request("sim", "fine", max_tokens=4)
    bad = chat_request("sim", "broken", max_tokens=4)
    raw_bad = json.loads(dispatches([bad])[0].to_bytes())
    raw_bad["request"]["max_tokens"] = -3  # fails validation, still names its request
    payload = json.dumps([json.loads(dispatches([good])[0].to_bytes()), raw_bad]).encode()
    send_slice_json(app, "sim", payload, priority=0)
    ok = wait_result(rclient, good.id, timeout_s=20)
    assert ok is not None and ok.status is ResultStatus.succeeded
    failed = wait_result(rclient, bad.id, timeout_s=20)
    assert failed is not None and failed.status is ResultStatus.failed
    assert failed.error is not None and failed.error.code == "invalid_dispatch"
    assert "max_tokens" in failed.error.message  # says which field was wrong
