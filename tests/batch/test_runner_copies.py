"""Several batch runners on one ledger: they share the batches by lease, a SIGKILLed
copy's batch is resumed by another, and a copy paused (SIGSTOP) past its lease writes
nothing once it resumes (SIGCONT) — each line exactly once in the output and in the
ledger. Real processes on the whole local stack (broker, Redis, scheduler, sim worker,
SQLite ledger); the stack's own runner is one more copy."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from batch_stack import Stack, wait_for
from tokenmill.config import load_settings
from tokenmill.ledger import RequestRow, shared_factory, transaction, unfinished_batch_requests
from tokenmill.producers.batch_files import CANCELLED, BatchDir, outcome_entry, read_jsonl
from tokenmill.producers.batch_lease import BatchLeases, LeaseLost, choose, lease_key
from tokenmill.producers.batch_runner import SERVICE, BatchRunner
from tokenmill.producers.batches import Batches

from tokenmill.presence import live_instances
from tokenmill.redis_client import async_redis
from tokenmill.stack import processes
from tokenmill.wire import Batch, BatchStatus

LEASE_S = 2.0
COPY = Path(__file__).with_name("runner_copy.py")


def lines(n: int, tokens: int, prefix: str, model: str = "slowsim") -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": tokens},
    }).encode() + b"\n" for i in range(n))


class Copy:
    """A batch runner process of the test's (lease :data:`LEASE_S`)."""

    def __init__(self, stack: Stack, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        env.update(stack.client_env())
        self.log = log
        self.proc: subprocess.Popen[bytes] = processes.start([sys.executable, str(COPY), str(LEASE_S)], log, env=env)
        self.instance = f"{os.uname().nodename}:{self.proc.pid}"

    def owns(self, rec: dict) -> bool:
        return rec["by"].startswith(self.instance + "/")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a paused copy cannot act on SIGTERM
            processes.stop_pid(self.proc.pid)
        self.proc.wait(timeout=10)


@pytest.fixture
def copies(client_env: Stack, tmp_path: Path) -> Iterator[list[Copy]]:
    made = [Copy(client_env, tmp_path / f"copy-{i}.log") for i in range(2)]
    r = redis.Redis.from_url(client_env.client_env()["TOKENMILL_REDIS_URL"])
    first_seen: dict[str, float] = {}

    def announced() -> bool:  # for over a second: every runner's view of the copies includes them
        for c in made:
            assert c.proc.poll() is None, c.log.read_text()[-3000:]
        live = {i.instance for i in live_instances(r) if i.service == SERVICE}
        now = time.monotonic()
        for c in made:
            if c.instance in live:
                first_seen.setdefault(c.instance, now)
        return all(now - first_seen.get(c.instance, now) > 1.2 for c in made)

    try:
        wait_for("both copies announced", announced, timeout=30)
        yield made
    finally:
        for c in made:
            c.stop()


def holding(stack: Stack, copy: Copy) -> list[str]:
    r = redis.Redis.from_url(stack.client_env()["TOKENMILL_REDIS_URL"])
    for inst in live_instances(r):
        if inst.service == SERVICE and inst.instance == copy.instance:
            return list(inst.detail.get("batches", []))
    return []


def records(batch_id: str) -> list[dict]:
    return list(read_jsonl(BatchDir.of(load_settings().home, batch_id).results))


def all_ended(batches: Batches, ids: list[str], timeout: float) -> list[Batch]:
    def ended() -> list[Batch] | None:
        now = [batches.retrieve(b) for b in ids]
        return now if all(b.status.is_terminal for b in now) else None

    return wait_for("every batch ends", ended, timeout=timeout, every=0.5)  # type: ignore[return-value]


def assert_exactly_once(done: Batch, custom_ids: list[str]) -> None:
    """Every line once in the output (none in errors), once in results.jsonl, written
    under non-decreasing lease tokens, and the ledger's usage equal to the output's."""
    assert done.status is BatchStatus.completed, done
    output = list(read_jsonl(Path(done.output_file)))
    assert [e["custom_id"] for e in output] == custom_ids
    assert list(read_jsonl(Path(done.error_file))) == []
    recs = records(done.id)
    assert Counter(r["custom_id"] for r in recs) == Counter(custom_ids), "a line recorded twice"
    tokens = [r["lease"] for r in recs]
    assert tokens == sorted(tokens), "a runner wrote after its lease had passed on"
    used = (sum(e["response"]["body"]["usage"]["prompt_tokens"] for e in output),
            sum(e["response"]["body"]["usage"]["completion_tokens"] for e in output))
    with transaction(shared_factory(load_settings().ledger_url)) as s:
        rows = s.query(RequestRow).filter(RequestRow.batch_id == done.id).all()
        ledger = (sum(r.prompt_tokens or 0 for r in rows), sum(r.completion_tokens or 0 for r in rows))
        assert {r.state.name for r in rows} == {"FINISHED"}
    assert ledger == used and used[1] > 0


def test_copies_share_batches_and_a_killed_copy_loses_nothing(client_env: Stack, copies: list[Copy]) -> None:
    a, b = copies
    batches = Batches(load_settings(), "alpha")
    made = {batches.create(lines(16, 30, f"k{n}-")).id: [f"k{n}-{i}" for i in range(16)] for n in range(3)}
    # Three runners (the stack's and two copies), three batches: each copy takes one.
    wait_for("both copies hold a batch", lambda: holding(client_env, a) and holding(client_env, b), timeout=20)
    [victim] = holding(client_env, a)
    wait_for("the doomed copy wrote", lambda: sum(a.owns(r) for r in records(victim)) >= 2, timeout=30)
    a.signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    killed_at = len(records(victim))
    ended = all_ended(batches, list(made), timeout=60)
    for done in ended:
        assert_exactly_once(done, made[done.id])
    after = records(victim)[killed_at:]
    assert after and not any(a.owns(r) for r in after), "another copy resumed the dead copy's batch"


def _ledger_write_lock_free(timeout_s: float = 2.0) -> bool:
    """True if a write transaction can start on the SQLite ledger (nobody holds it for long)."""
    path = load_settings().ledger_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def test_a_paused_copy_writes_nothing_once_resumed(client_env: Stack, copies: list[Copy]) -> None:
    a, _ = copies
    batches = Batches(load_settings(), "beta")
    made = {batches.create(lines(20, 40, f"p{n}-")).id: [f"p{n}-{i}" for i in range(20)] for n in range(3)}
    wait_for("the copy holds a batch", lambda: holding(client_env, a), timeout=20)
    [held] = holding(client_env, a)
    wait_for("the copy wrote", lambda: sum(a.owns(r) for r in records(held)) >= 2, timeout=30)
    for _ in range(5):  # pause it outside a ledger transaction (else nobody could write)
        a.signal(signal.SIGSTOP)
        if _ledger_write_lock_free():
            break
        a.signal(signal.SIGCONT)
        _ledger_write_lock_free()  # let it end that transaction before the next try
    else:
        pytest.fail("the copy held the ledger's write lock at every pause")
    mine = sum(a.owns(r) for bid in made for r in records(bid))
    token = max(r["lease"] for r in records(held))
    # Past its lease another runner holds the batch (a new grant) and writes for it.
    wait_for("another runner resumed the batch",
             lambda: any(r["lease"] > token and not a.owns(r) for r in records(held)), timeout=30)
    a.signal(signal.SIGCONT)
    wait_for("the resumed copy noticed", lambda: b"batch lease lost" in a.log.read_bytes(), timeout=10)
    ended = all_ended(batches, list(made), timeout=60)
    assert a.proc.poll() is None, "the resumed copy kept serving"
    assert sum(a.owns(r) for bid in made for r in records(bid)) == mine, "the resumed copy wrote"
    for done in ended:
        assert_exactly_once(done, made[done.id])


async def test_the_fence_refuses_a_write_after_the_lease_moved(tm_home: Path, redis_url: str) -> None:
    """In one process: a runner whose lease another runner took writes nothing, neither
    to results.jsonl nor to the ledger; the new holder writes under a higher token."""
    settings = load_settings()
    batch = Batches(settings, "alpha").create(lines(3, 2, "f", model="sim"))
    factory = shared_factory(settings.ledger_url)
    client = async_redis(redis_url)
    old, new = (BatchRunner(settings, None, lease_s=30) for _ in range(2))  # type: ignore[arg-type]
    for runner in (old, new):
        runner.factory, runner.redis = factory, client
        runner.leases = BatchLeases(client, ttl_s=30)
    try:
        first = await old.leases.acquire(batch.id)
        assert first is not None and await new.leases.acquire(batch.id) is None
        t = await old._load(batch)
        assert t is not None
        rid = next(iter(t.lines))
        status, entry = outcome_entry(batch.id, t.lines[rid].line, t.lines[rid].custom_id, None, ended_as=CANCELLED)
        await client.delete(lease_key(batch.id))  # as if it expired while the old holder was paused
        second = await new.leases.acquire(batch.id)
        assert second is not None and second.token > first.token
        with pytest.raises(LeaseLost):
            await old._record(t, [(rid, status, entry, None)])
        assert records(batch.id) == []
        with transaction(factory) as s:
            assert len(unfinished_batch_requests(s, batch.id)) == 3
        t2 = await new._load(batch)
        assert t2 is not None
        await new._record(t2, [(rid, status, entry, None)])
        assert [(r["request_id"], r["lease"]) for r in records(batch.id)] == [(rid, second.token)]
        assert await old.leases.renew() == [] and batch.id not in old.leases.held  # forgotten at the fence
    finally:
        await client.aclose()


def test_choose_spreads_free_batches_over_copies() -> None:
    free = [f"b{i}" for i in range(4)]
    held: dict[str, list[str]] = {"x": [], "y": []}
    for _ in range(4):  # polls, alternating copies; one new batch a poll, up to the share
        for owner, mine in held.items():
            left = [b for b in free if all(b not in h for h in held.values())]
            mine += choose(left, active=4, held=len(mine), copies=2, owner=owner, free_since={}, now=0.0, ttl_s=5)
    assert sorted(map(len, held.values())) == [2, 2]
    # At its share a copy takes nothing more, unless a batch stayed free for a whole TTL.
    def at_share(free_since: dict[str, float]) -> list[str]:
        return choose(["b9"], active=4, held=2, copies=2, owner="x", free_since=free_since, now=10.0, ttl_s=5)

    assert at_share({"b9": 6.0}) == []
    assert at_share({"b9": 4.0}) == ["b9"]
