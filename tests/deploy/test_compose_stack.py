"""The compose file's own commands, without Docker.

Every tokenmill service of docker-compose.yml runs as local processes — its ``command``
with its ``environment`` as ``docker compose config`` resolves them, as many copies as
it declares — against a loopback PostgreSQL, a Redis with a password and AOF, and the
Kafka-protocol broker (:mod:`compose_processes` says how the container world is mapped).
``migrate`` runs first and must exit 0. Then a batch goes through the gateway with the
official ``openai`` SDK; mid-run the active scheduler, one stream processor, one batch
runner, one webhook dispatcher and the worker are SIGKILLed. Like compose's
``restart: unless-stopped``, each killed process is started again after a short delay
(RESTART_DELAY_S); the other copies cover meanwhile. The batch must complete with every
line exactly once, the ledger's usage must equal the results' usage to the token, and
the batch webhook must arrive exactly once.

``make test`` runs it small: 100 lines, the worker spared (a killed worker's slices wait
out the 60 s Celery visibility timeout; tests/workers/test_celery_worker.py kills one
mid-request). With ``$DEPLOY_DRILL`` set (~3 min on 2 cores) the worker is killed too:
``make deploy-drill`` (300 lines) and ``make faults`` (the issue's 2,000,
``$DEPLOY_DRILL_LINES``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import sqlalchemy as sa
from compose_file import TEST_ENV, Service, resolved, tokenmill_services
from compose_processes import Copy, Translation, volume_and_secret_paths, wait_for
from tokenmill.config import EXAMPLE_CONFIG
from tokenmill.ledger import UsageRecord

from tokenmill.stack import processes

FULL = bool(os.environ.get("DEPLOY_DRILL"))
LINES = int(os.environ.get("DEPLOY_DRILL_LINES", "300" if FULL else "100"))
API_KEY = "tm-alpha-demo-key"  # the example config's demo key for tenant alpha
REDIS_PASSWORD = TEST_ENV["REDIS_PASSWORD"]
#: like compose restarting a dead container (its first restart comes at once; a delay
#: here makes sure the other copies really cover)
RESTART_DELAY_S = 2.0
KILL_AT = 0.3  #: share of the lines done when the kills strike
#: above the worker's 60 s Celery visibility timeout: the killed worker's slices return then
BATCH_DONE_S = (120.0 if FULL else 60.0) + LINES * 0.1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(int(240 + BATCH_DONE_S)),
]


def _receiver_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "faults" / "webhook_receiver.py"
    spec = importlib.util.spec_from_file_location("faults_webhook_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Redis like the compose file's: password required, append-only file."""
    port = processes.free_port()
    data = tmp_path_factory.mktemp("redis-deploy")
    proc = processes.spawn(
        "redis",
        [*processes.redis_argv(port, data), "--requirepass", REDIS_PASSWORD],
        data / "redis.log",
        lambda: _redis_ok(port),
    )
    yield port
    processes.stop_pid(proc.pid)


def _redis_ok(port: int) -> bool:
    try:
        return bool(redis.Redis(host=processes.LOOPBACK, port=port, password=REDIS_PASSWORD,
                                socket_timeout=0.5).ping())  # fmt: skip
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def compose_database(postgres_server: Any) -> str:
    """The compose file's database: user ``tokenmill`` (any password: trust auth),
    database ``tokenmill``, empty."""
    postgres_server.admin("DROP DATABASE IF EXISTS tokenmill WITH (FORCE)")
    postgres_server.admin(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenmill') "
        "THEN CREATE ROLE tokenmill LOGIN; END IF; END $$"
    )
    postgres_server.admin("CREATE DATABASE tokenmill OWNER tokenmill")
    return f"{processes.LOOPBACK}:{postgres_server.port}"


def _drill_config(path: Path) -> Path:
    """The example config with a sim engine slow enough that the kills land mid-batch."""
    text = EXAMPLE_CONFIG.read_text()
    fast = "engine_args = { prefill_ms_per_token = 0.0, decode_ms_per_step = 0.0, decode_ms_per_seq = 0.0 }"
    assert fast in text, "config/example.toml's [models.sim] changed: update this test"
    path.write_text(text.replace(fast, "engine_args = { decode_ms_per_step = 500.0 }", 1))
    return path


class Stack:
    def __init__(self, config: dict[str, Any], translation: Translation, root: Path) -> None:
        self.config, self.translation, self.root = config, translation, root
        self.copies: list[Copy] = []
        #: copy name → times it exited on its own (not killed by the test)
        self.exits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def supervise(self) -> None:
        """Restart every dead copy RESTART_DELAY_S after it died, as compose's
        ``restart: unless-stopped`` does."""
        self._supervisor.start()

    def _supervise(self) -> None:
        dead_since: dict[str, float] = {}
        while not self._stop.wait(0.25):
            for c in list(self.copies):
                if c.alive():
                    dead_since.pop(c.name, None)
                    continue
                since = dead_since.setdefault(c.name, time.monotonic())
                if time.monotonic() - since >= RESTART_DELAY_S:
                    if c.proc is not None and c.proc.returncode != -9:
                        self.exits[c.name] += 1
                    c.start()
                    dead_since.pop(c.name, None)

    def shutdown(self) -> None:
        self._stop.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        for c in self.copies:
            c.stop()

    def service(self, name: str) -> Service:
        return next(s for s in tokenmill_services(self.config) if s.name == name)

    def copy(self, service: Service, index: int) -> Copy:
        paths = volume_and_secret_paths(self.config, service, self.root)
        translation = Translation(
            self.translation.hosts, paths, self.translation.base_env, self.translation.logs,
            self.translation.used_ports,
        )  # fmt: skip
        return translation.copy(service, index)

    def of(self, service: str) -> list[Copy]:
        return [c for c in self.copies if c.service == service]

    def logs(self) -> str:
        return "\n".join(c.tail() for c in self.copies)


@pytest.fixture
def stack(
    tmp_path: Path, kafka_bootstrap: str, secure_redis: int, compose_database: str
) -> Iterator[Stack]:
    config_file = _drill_config(tmp_path / "tokenmill.toml")
    config = resolved({**TEST_ENV, "TOKENMILL_CONFIG_FILE": str(config_file)})
    logs = tmp_path / "logs"
    logs.mkdir()
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("TOKENMILL_", "FLOWER_", "PYTEST_"))}  # fmt: skip
    base_env["TMPDIR"] = str(tmp_path)
    hosts = {
        "kafka:9092": kafka_bootstrap,
        "redis:6379": f"{processes.LOOPBACK}:{secure_redis}",
        "postgres:5432": compose_database,
    }
    built = Stack(config, Translation(hosts, {}, base_env, logs), tmp_path)
    try:
        yield built
    finally:
        built.shutdown()


def test_compose_commands_survive_kills(stack: Stack) -> None:
    services = tokenmill_services(stack.config)
    by_name = {s.name: s for s in services}
    assert "worker-gpu" not in by_name, "the GPU worker is in the gpu profile only"

    # 1. migrate, as the one-shot every other service waits for; twice: idempotent
    for attempt in (1, 2):
        migrate = stack.copy(by_name["migrate"], attempt)
        migrate.start()
        assert migrate.proc is not None
        assert migrate.proc.wait(timeout=120) == 0, f"migrate failed:\n{migrate.tail(30)}"
    started = time.monotonic()

    # 2. everything else, as many copies as declared
    for service in services:
        if service.one_shot:
            continue
        assert service.depends_on.get("migrate") == "service_completed_successfully"
        for index in range(service.replicas):
            copy = stack.copy(service, index)
            copy.start()
            stack.copies.append(copy)
    gateway = stack.of("gateway")[0]
    base_url = f"http://{processes.LOOPBACK}:{gateway.ports[8080]}"

    stack.supervise()

    def ready() -> bool:
        try:
            return httpx.get(base_url + "/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the gateway's /readyz", ready, 120.0, 0.5)
    _wait_streams_ready(stack)
    startup_s = time.monotonic() - started

    receiver_mod = _receiver_module()
    with receiver_mod.receiving() as receiver:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=3,
                               timeout=60.0)  # fmt: skip
        upload = client.files.create(file=("drill.jsonl", _batch_file(LINES)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
            extra_body={"webhook": receiver.url + "/batch"},
        )  # fmt: skip

        def done_share() -> float:
            b = client.batches.retrieve(batch.id)
            counts = b.request_counts
            return (counts.completed + counts.failed) / LINES if counts else 0.0

        try:
            wait_for(f"{KILL_AT:.0%} of the batch", lambda: done_share() >= KILL_AT, BATCH_DONE_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; exits {dict(stack.exits)}\n{stack.logs()}") from None
        share_at_kill = done_share()

        # 3. the kills, then compose's restart of each killed container
        victims = [_active_scheduler(stack), stack.of("streams")[0], stack.of("batch-runner")[0],
                   stack.of("webhooks")[0], *(stack.of("worker-sim")[:1] if FULL else [])]  # fmt: skip
        for victim in victims:
            victim.kill()  # the supervisor restarts each RESTART_DELAY_S later
        killed_at = time.monotonic()

        def ended() -> Any:
            b = client.batches.retrieve(batch.id)
            return b if b.status in ("completed", "failed", "expired", "cancelled") else None

        try:
            final = wait_for("the batch to end", ended, BATCH_DONE_S, 1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; exits {dict(stack.exits)}\n{stack.logs()}") from None
        recovery_s = time.monotonic() - killed_at
        assert final.status == "completed", f"batch ended {final.status}\n{stack.logs()}"

        # 4. every line exactly once, all succeeded
        output = _jsonl(client, final.output_file_id)
        errors = _jsonl(client, final.error_file_id)
        seen = Counter(line["custom_id"] for line in output + errors)
        expected = {f"line-{i}" for i in range(LINES)}
        assert set(seen) == expected, f"missing {sorted(expected - set(seen))[:5]}"
        assert max(seen.values()) == 1, [c for c, n in seen.items() if n > 1][:5]
        assert not errors, errors[:3]

        # 5. the ledger's usage equals the results' usage, to the token
        usage = {
            line["response"]["request_id"]: line["response"]["body"]["usage"] for line in output
        }
        db_url = stack.copy(by_name["gateway"], 99).env["TOKENMILL_DATABASE_URL"]
        def all_billed() -> dict[str, tuple[int, int]] | None:
            rows = _usage_rows(db_url, list(usage))
            return rows if len(rows) == len(usage) else None

        ledger = wait_for("the ledger to hold every line's usage", all_billed, 60.0, 1.0)
        wrong = [
            rid for rid, u in usage.items()
            if ledger[rid] != (u["prompt_tokens"], u["completion_tokens"])
        ]  # fmt: skip
        assert not wrong, f"{len(wrong)} lines billed other tokens than delivered: {wrong[:5]}"
        assert sum(p + c for p, c in ledger.values()) == sum(
            u["prompt_tokens"] + u["completion_tokens"] for u in usage.values()
        )

        # 6. the batch's webhook, exactly once
        posts = wait_for("the batch webhook", lambda: receiver.received("/batch"), 60.0, 0.5)
        _settle_no_duplicate(receiver)
        posts = receiver.received("/batch")
        assert len(posts) == 1, f"{len(posts)} deliveries of the batch webhook"
        assert posts[0].json()["data"]["id"] == batch.id
        client.close()

    print(f"\ndeploy drill: {LINES} lines, start-up {startup_s:.1f}s, "
          f"kills at {share_at_kill:.0%}, recovered and done {recovery_s:.1f}s after; "
          f"copies that exited on their own (restarted): {dict(stack.exits)}")  # fmt: skip


def _wait_streams_ready(stack: Stack) -> None:
    for copy in stack.of("streams"):
        port = next(iter(copy.ports.values()))
        wait_for(f"{copy.name} metrics", lambda p=port: processes.port_open(p), 60.0)


def _active_scheduler(stack: Stack) -> Copy:
    """The scheduler copy whose presence says ``active``; the first copy if no copy
    announces a role yet."""
    from tokenmill.presence import live_instances

    url = stack.copies[0].env["TOKENMILL_REDIS_URL"]
    client = redis.Redis.from_url(url)
    try:
        active = [i for i in live_instances(client) if i.service == "scheduler" and i.role == "active"]
    finally:
        client.close()
    pids = {int(i.instance.rsplit(":", 1)[1]) for i in active}
    for copy in stack.of("scheduler"):
        if copy.proc is not None and copy.proc.pid in pids:
            return copy
    return stack.of("scheduler")[0]


def _settle_no_duplicate(receiver: Any) -> None:
    """Give a duplicate delivery a bounded chance to show up (the dispatcher's retry
    backoff is far shorter)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and len(receiver.received("/batch")) <= 1:
        time.sleep(0.25)


def _batch_file(lines: int) -> bytes:
    import json

    rows = (
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "sim", "max_tokens": 4 + i % 9,
                  "messages": [{"role": "user", "content": "why " * (1 + i % 7)}]}}
        for i in range(lines)
    )  # fmt: skip
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    import json

    if not file_id:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _usage_rows(db_url: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    table = UsageRecord.__table__
    out: dict[str, tuple[int, int]] = {}
    try:
        with engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for row in conn.execute(sa.select(table).where(table.c.request_id.in_(chunk))):
                    out[row.request_id] = (row.prompt_tokens, row.completion_tokens)
    finally:
        engine.dispose()
    return out
