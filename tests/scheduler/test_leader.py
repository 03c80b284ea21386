"""Scheduler active/standby: the lease, its fencing token, and the fence on every write.

Unit-ish tests run :mod:`tokenmill.scheduler.leader` and the service's fenced scripts
against a real Redis. The process tests run real ``tokenmill scheduler`` processes (and a
``sim`` worker) on a broker and Redis of their own: a paused (SIGSTOP) leader is replaced,
and once resumed (SIGCONT) dispatches nothing, writes no snapshot and exits; a SIGKILLed
leader's standby dispatches within seconds. Every request completes exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from tokenmill.config import EXAMPLE_CONFIG, Settings, load_settings
from tokenmill.producers.trusted import TrustedProducer
from tokenmill.scheduler.leader import (
    FENCED_EXIT_CODE,
    Fenced,
    LeaderLease,
    fenced_script,
    lease_key,
)
from tokenmill.scheduler.publish import SlicePublisher
from tokenmill.scheduler.service import _MARK_DISPATCHED, _WRITE_STATE, SNAPSHOT_KEY
from tokenmill.workers import keys
from tokenmill.workers.celery_app import create_app, send_slice_json
from tokenmill.workers.results import get_result_async

from tokenmill import wire
from tokenmill.presence import live_instances
from tokenmill.stack import processes


def wait_until(
    what: str, check: Callable[[], object], timeout_s: float, every_s: float = 0.05
) -> object:
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)
    return got


async def await_until(what: str, check: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[misc]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- the lease and the fenced scripts, on a real Redis -----------------------------------


@pytest.fixture
async def client(redis_url: str) -> aredis.Redis:
    c = aredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_one_holder_tokens_grow_and_an_expired_holder_is_fenced(
    client: aredis.Redis, unique: str
) -> None:
    a = LeaderLease(client, unique, ttl_s=0.3, instance="a")
    b = LeaderLease(client, unique, ttl_s=0.3, instance="b")
    assert await a.try_acquire()
    assert not await b.try_acquire()  # held: a standby waits
    assert a.held and a.valid() and not b.held
    await a.renew()
    first = a.token
    # a stops renewing: its grant expires and b takes over, with a larger token.
    await await_until("b to take the expired lease", b.try_acquire, 3.0)
    assert b.token is not None and first is not None and b.token > first
    assert await client.get(b.key) == f"{b.token} b".encode()
    with pytest.raises(Fenced, match="renewal refused"):
        await a.renew()
    assert not a.held
    with pytest.raises(Fenced):
        await a.ensure()
    # b hands over at a clean stop: the next holder need not wait for the TTL.
    await b.release()
    c = LeaderLease(client, unique, ttl_s=5.0, instance="c")
    assert await c.try_acquire() and c.token > b.token


async def test_ensure_renews_a_stale_grant_only_while_nobody_took_it(
    client: aredis.Redis, unique: str
) -> None:
    a = LeaderLease(client, unique, ttl_s=0.5, instance="a")
    assert await a.try_acquire()
    await client.pexpire(a.key, 10_000)  # Redis still holds it ...
    await await_until("the local validity to lapse", lambda: _async_value(not a.valid()), 2.0)
    await a.ensure()  # ... so asking Redis renews it: nobody else acted meanwhile
    assert a.valid()


async def test_a_lapsed_grant_is_taken_back_only_while_no_grant_followed(
    client: aredis.Redis, unique: str
) -> None:
    a = LeaderLease(client, unique, ttl_s=0.3, instance="a")
    assert await a.try_acquire()
    await client.delete(a.key)  # lapsed (a stalled holder) and nobody took it ...
    await a.renew()  # ... so the holder takes it back, with its own token
    assert await client.get(a.key) == a.value.encode() and a.valid()
    await client.delete(a.key)
    b = LeaderLease(client, unique, ttl_s=5.0, instance="b")
    assert await b.try_acquire()  # a newer grant exists: the old one is gone for good
    await client.delete(b.key)  # even if that one lapses in turn
    with pytest.raises(Fenced, match="renewal refused"):
        await a.renew()
    # A released grant cannot be taken back by a renewal racing the release.
    c = LeaderLease(client, unique, ttl_s=5.0, instance="c")
    assert await c.try_acquire()
    value = c.value
    await c.release()
    c.value = value
    with pytest.raises(Fenced):
        await c.renew()


def test_a_starved_event_loop_keeps_the_lease(redis_url: str, unique: str) -> None:
    """Renewals run on their own thread: a loop blocked for twice the TTL (a slice on a
    loaded machine) leaves the grant held, and no standby can take it meanwhile."""

    async def scenario() -> None:
        aclient = aredis.Redis.from_url(redis_url)
        sync = redis.Redis.from_url(redis_url, socket_timeout=1.0)
        lease = LeaderLease(aclient, unique, ttl_s=0.5, instance="busy", renew_client=sync)
        standby = LeaderLease(aclient, unique, ttl_s=0.5, instance="standby")
        stop = asyncio.Event()
        try:
            assert await lease.try_acquire()
            keeper = asyncio.create_task(lease.keep(stop, every_s=0.1))
            await asyncio.sleep(0.05)  # the thread has started
            time.sleep(1.2)  # the loop is blocked: no coroutine runs
            assert sync.get(lease.key) == lease.value.encode()
            assert not await standby.try_acquire()
            assert lease.valid() and not keeper.done()
            stop.set()
            await asyncio.wait_for(keeper, 2.0)
            await lease.release()
            assert await standby.try_acquire()  # handed over at once
        finally:
            sync.close()
            await aclient.aclose()

    asyncio.run(scenario())


async def _async_value(value: object) -> object:
    return value


async def test_fenced_scripts_refuse_a_stale_grant_and_write_nothing(
    client: aredis.Redis, redis_url: str, unique: str
) -> None:
    old = LeaderLease(client, unique, ttl_s=0.2, instance="old")
    new = LeaderLease(client, unique, ttl_s=10.0, instance="new")
    assert await old.try_acquire()
    probe = client.register_script(fenced_script("redis.call('SET', KEYS[2], ARGV[2]) return 1"))
    target = f"test:{unique}:probe"
    assert await probe(keys=[old.key, target], args=[old.value, "by-old"]) == 1
    await await_until("the new leader", new.try_acquire, 3.0)
    assert await probe(keys=[old.key, target], args=[old.value, "again"]) == -1
    assert await client.get(target) == b"by-old"

    # The service's own scripts: the dispatch (marks, in-flight records, Celery push)
    # and the checkpoint (snapshot, in-flight hash) write nothing for the old grant.
    mark, in_flight, queue = f"test:{unique}:mark", f"test:{unique}:in-flight", f"test:{unique}:q"
    dispatch = client.register_script(_MARK_DISPATCHED)
    args = [old.value, 60, old.token, 1, "r1", "{}", "LPUSH", "message"]
    assert await dispatch(keys=[old.key, in_flight, mark, queue], args=args) == -1
    assert not await client.exists(mark, in_flight, queue)
    args[0], args[2] = new.value, new.token
    assert await dispatch(keys=[new.key, in_flight, mark, queue], args=args) == 1
    assert await client.get(mark) == str(new.token).encode()
    assert await client.hget(in_flight, "r1") == b"{}" and await client.lrange(queue, 0, -1) == [
        b"message"
    ]

    snapshot = f"test:{unique}:snapshot"
    write = client.register_script(_WRITE_STATE)
    state_keys = [old.key, snapshot, in_flight]
    assert await write(keys=state_keys, args=[old.value, '{"v":1}', 1, "r1", "r2", "x"]) == -1
    assert not await client.exists(snapshot) and await client.hget(in_flight, "r1") == b"{}"
    state_keys[0] = new.key
    assert await write(keys=state_keys, args=[new.value, '{"v":2}', 1, "r1", "r2", "x"]) == 1
    assert await client.get(snapshot) == b'{"v":2}'
    assert await client.hgetall(in_flight) == {b"r2": b"x"}


def test_the_captured_publish_is_the_message_celery_sends(redis_url: str, unique: str) -> None:
    """The fenced dispatch pushes what ``send_slice_json`` would have pushed."""
    pool, payload = f"leader-{unique}", b'[{"request":{"id":"x"}}]'
    r = redis.Redis.from_url(redis_url)
    send_slice_json(create_app(redis_url), pool, payload, 3)
    sent = json.loads(r.lpop(f"tokenmill.pool.{pool}:3") or b"{}")
    publisher = SlicePublisher(create_app(redis_url))
    try:
        commands = publisher.commands(pool, payload, 3)
    finally:
        publisher.close()
    assert r.llen(f"tokenmill.pool.{pool}:3") == 0  # captured, not sent
    pushes = [c for c in commands if c.name == "LPUSH"]
    assert [c.key for c in pushes] == [f"tokenmill.pool.{pool}:3"]
    built = json.loads(pushes[0].payload)
    for m in (sent, built):  # ids differ per message
        m["headers"].pop("id"), m["headers"].pop("root_id")
        for k in ("correlation_id", "reply_to", "delivery_tag"):
            m["properties"].pop(k)
    assert built == sent
    assert {c.name for c in commands} == {"LPUSH", "PUBLISH"}  # and the task-sent event


# -- real scheduler processes ------------------------------------------------------------

MODEL = "fencesim"
MODEL_CONFIG = f"""
[models.{MODEL}]
engine = "sim"
max_in_flight = 8
engine_args = {{ decode_ms_per_step = 15.0 }}

[[price_cards]]
model = "{MODEL}"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "0.10"
output_per_million = "0.40"
"""


def stack_config() -> str:
    """The example config without budgets (no ledger needed), plus a slowish sim model."""
    lines = [ln for ln in EXAMPLE_CONFIG.read_text().splitlines() if not ln.startswith("budget")]
    return "\n".join(lines) + "\n" + MODEL_CONFIG


@dataclass
class FenceStack:
    root: Path
    env: dict[str, str]
    redis: redis.Redis
    settings: Settings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    n: int = 0

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        self.n += 1
        log = open(self.root / f"{argv[0]}-{self.n}.log", "wb")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", *argv], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def role(self, proc: subprocess.Popen[bytes]) -> tuple[str, dict] | None:
        for inst in live_instances(self.redis):
            if inst.service == "scheduler" and inst.instance.rsplit(":", 1)[-1] == str(proc.pid):
                return inst.role, dict(inst.detail)
        return None

    def scheduler(self, role: str) -> subprocess.Popen[bytes]:
        proc = self.start("scheduler")
        wait_until(
            f"scheduler {proc.pid} {role}", lambda: (self.role(proc) or ("",))[0] == role, 30
        )
        return proc

    def stop_schedulers(self) -> None:
        for p in self.procs:
            if p.args[3:4] == ["scheduler"] and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
                p.wait(15)

    def tokens_of_marks(self) -> dict[str, int]:
        return {
            k.decode().removeprefix(keys.dispatched("")): int(v)
            for k in self.redis.scan_iter(match=keys.dispatched("*"), count=1000)
            if (v := self.redis.get(k)) is not None
        }

    def submit(self, n: int) -> list[str]:
        async def go() -> list[str]:
            async with TrustedProducer("alpha", settings=self.settings, kafka_bootstrap=self.env["TOKENMILL_KAFKA_URL"],
                                       redis_url=self.env["TOKENMILL_REDIS_URL"]) as p:  # fmt: skip
                reqs = [p.build(MODEL, messages=[{"role": "user", "content": f"q {i}"}], max_tokens=4)
                        for i in range(n)]  # fmt: skip
                return await p.submit_many(reqs)

        return asyncio.run(go())

    def results(self, ids: list[str]) -> dict[str, wire.Result]:
        async def go() -> dict[str, wire.Result]:
            c = aredis.Redis.from_url(self.env["TOKENMILL_REDIS_URL"])
            try:
                got = {rid: await get_result_async(c, rid) for rid in ids}
            finally:
                await c.aclose()
            return {rid: r for rid, r in got.items() if r is not None}

        return asyncio.run(go())

    def all_done_once(self, ids: list[str], timeout_s: float = 60) -> None:
        wait_until(
            f"{len(ids)} results", lambda: len(self.results(ids)) == len(ids), timeout_s, 0.2
        )
        results = self.results(ids)
        assert {r.status for r in results.values()} == {wire.ResultStatus.succeeded}
        runs = self.redis.mget([keys.attempts(rid) for rid in ids])
        assert [int(x or 0) for x in runs] == [1] * len(ids)  # each ran exactly once


@pytest.fixture(scope="module")
def fence_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FenceStack]:
    root = tmp_path_factory.mktemp("fence")
    kafka_port, redis_port = processes.free_port(), processes.free_port()
    broker = processes.spawn("kafka broker", processes.kafka_argv(kafka_port), root / "broker.log",
                             lambda: processes.port_open(kafka_port))  # fmt: skip
    rds = processes.spawn("redis", processes.redis_argv(redis_port, root), root / "redis.log",
                          lambda: processes.redis_ready(redis_port))  # fmt: skip
    (root / "tokenmill.toml").write_text(stack_config())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(
        TOKENMILL_HOME=str(root / "home"),
        TOKENMILL_CONFIG=str(root / "tokenmill.toml"),
        TOKENMILL_KAFKA_URL=f"{processes.LOOPBACK}:{kafka_port}",
        TOKENMILL_REDIS_URL=f"redis://{processes.LOOPBACK}:{redis_port}/0",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENMILL_CONFIG", env["TOKENMILL_CONFIG"])
        settings = load_settings()
    stack = FenceStack(root, env, redis.Redis.from_url(env["TOKENMILL_REDIS_URL"]), settings)
    try:
        stack.start("worker", "--model", MODEL)
        yield stack
    finally:
        for p in stack.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                processes.stop_pid(p.pid)
        processes.stop_pid(rds.pid)
        processes.stop_pid(broker.pid)


def test_a_paused_leader_is_replaced_and_dispatches_nothing_when_it_wakes(
    fence_stack: FenceStack,
) -> None:
    s = fence_stack
    old = s.scheduler("active")
    standby = s.scheduler("standby")
    old_token = s.role(old)[1]["fencing_token"]  # type: ignore[index]
    first = s.submit(40)
    s.all_done_once(first)

    # Pause the leader with work queued behind it (some dispatched, most not): the
    # standby takes over and serves it.
    during = s.submit(120)
    wait_until("the leader to dispatch some", lambda: sum(map(bool, s.redis.mget(
        [keys.dispatched(r) for r in during]))) >= 8, 15, 0.01)  # fmt: skip
    os.kill(old.pid, signal.SIGSTOP)
    assert not all(s.redis.mget([keys.dispatched(r) for r in during]))
    wait_until(
        "the standby to become active", lambda: (s.role(standby) or ("",))[0] == "active", 15
    )
    new_token = s.role(standby)[1]["fencing_token"]  # type: ignore[index]
    assert new_token > old_token
    during += s.submit(40)
    s.all_done_once(during)
    by_old = {rid for rid, t in s.tokens_of_marks().items() if t == old_token}

    # Watch the snapshot while the old leader wakes: no write of its token may appear.
    seen: set[int] = set()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            raw = s.redis.get(SNAPSHOT_KEY)
            if raw:
                seen.add(json.loads(raw).get("fencing_token"))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.kill(old.pid, signal.SIGCONT)
    after = s.submit(40)
    try:
        assert old.wait(15) == FENCED_EXIT_CODE
    finally:
        watching.set()
        watcher.join(5)
    s.all_done_once(after)

    assert {rid for rid, t in s.tokens_of_marks().items() if t == old_token} == by_old
    assert not by_old & set(after)
    assert old_token not in seen and new_token in seen
    assert "scheduler fenced" in Path(old.log_path).read_text()  # type: ignore[attr-defined]
    assert (s.role(standby) or ("",))[0] == "active"
    s.stop_schedulers()


def test_a_standby_dispatches_within_seconds_of_the_leaders_sigkill(
    fence_stack: FenceStack,
) -> None:
    s = fence_stack
    old = s.scheduler("active")
    s.scheduler("standby")
    old_token = s.role(old)[1]["fencing_token"]  # type: ignore[index]
    s.all_done_once(s.submit(20))
    os.kill(old.pid, signal.SIGKILL)
    killed = time.monotonic()
    ids = s.submit(20)

    def dispatched() -> bool:  # only the standby can have dispatched these
        return any(s.redis.mget([keys.dispatched(r) for r in ids]))

    wait_until("the standby's first dispatch", dispatched, 15, 0.02)
    took = time.monotonic() - killed
    print(f"failover: SIGKILL to first dispatch {took:.2f}s")
    token = int((s.redis.get(lease_key()) or b"0").split()[0])
    assert token > old_token
    assert {int(v) for v in s.redis.mget([keys.dispatched(r) for r in ids]) if v} == {token}
    s.all_done_once(ids)
    assert took <= 8.0, f"failover took {took:.1f}s"
    s.stop_schedulers()
