"""Helpers for the worker tests: config files, worker processes, event collection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis
from tokenmill.workers.heartbeat import live_workers
from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV

from tokenmill.stack import processes
from tokenmill.wire import (
    TOKEN_EVENTS_TOPIC,
    Dispatch,
    Endpoint,
    EventKind,
    InferenceRequest,
    TokenEvent,
    decode,
)

VLLM_ENV = OFFLINE_CPU_ENV


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(path: Path, home: Path, models: dict[str, dict[str, Any]]) -> Path:
    """A minimal tokenmill.toml serving ``models`` (each a [models.NAME] table)."""
    lines = [f"home = {json.dumps(str(home))}"]
    for name, table in models.items():
        lines.append(f"[models.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for name in models:
        lines += [
            "[[price_cards]]",
            f'model = "{name}"',
            "effective_from = 2026-01-01T00:00:00Z",
            'input_per_million = "0.10"',
            'output_per_million = "0.40"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_request(model: str, content: str = "hello world", *, max_tokens: int = 16, **body: Any) -> InferenceRequest:
    return InferenceRequest(
        tenant="acme",
        model=model,
        body={"messages": [{"role": "user", "content": content}], **body},
        max_tokens=max_tokens,
        prompt_tokens_estimate=4,
    )


def completion_request(model: str, prompt: str = "the quick brown fox", *, max_tokens: int = 16, **body: Any) -> InferenceRequest:
    return InferenceRequest(
        tenant="acme",
        model=model,
        endpoint=Endpoint.completions,
        body={"prompt": prompt, **body},
        max_tokens=max_tokens,
        prompt_tokens_estimate=4,
    )


def dispatches(reqs: Iterable[InferenceRequest]) -> list[Dispatch]:
    return [Dispatch(request=r) for r in reqs]


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, *, alive: Callable[[], bool] | None = None) -> Any:
    """Poll ``cond`` until truthy (bounded); fail fast if ``alive`` says the process died."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if alive is not None and not alive():
            raise AssertionError(f"process died while waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class WorkerProcess:
    """``python -m tokenmill.workers.commands worker`` as a child process."""

    def __init__(
        self,
        model: str,
        *,
        config: Path,
        redis_url: str,
        kafka: str,
        log_dir: Path,
        pool: str | None = None,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.pool = pool or model
        self.redis_url = redis_url
        self.log_path = log_dir / f"worker-{model}-{uuid.uuid4().hex[:6]}.log"
        argv = [sys.executable, "-m", "tokenmill.workers.commands", "worker", "--model", model]
        if pool:
            argv += ["--pool", pool]
        argv += list(extra_args)
        full_env = {
            **os.environ,
            **VLLM_ENV,
            "TOKENMILL_CONFIG": str(config),
            "TOKENMILL_REDIS_URL": redis_url,
            "TOKENMILL_KAFKA_URL": kafka,
            **(env or {}),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def name(self) -> str | None:
        beats = live_workers(redis.Redis.from_url(self.redis_url), self.pool, timeout_s=3.0)
        mine = [b for b in beats if b.worker.endswith(f"-{self.proc.pid}")]
        return mine[0].worker if mine else None

    def wait_ready(self, timeout_s: float = 60.0) -> str:
        try:
            return wait_for(self.name, timeout_s, f"worker {self.model} heartbeat", alive=lambda: self.alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{processes.tail(self.log_path, 40)}") from None

    def wait_consuming(self, timeout_s: float = 30.0) -> None:
        """Until Celery says the worker is ready (it consumes after the engine started)."""
        wait_for(
            lambda: b" ready." in self.log_path.read_bytes(), timeout_s, "celery ready",
            alive=lambda: self.alive,
        )

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        return processes.tail(self.log_path, 60)


def collect_events(
    bootstrap: str,
    request_ids: Iterable[str],
    *,
    until: Callable[[list[TokenEvent]], bool] | None = None,
    timeout_s: float = 30.0,
    settle_s: float = 0.0,
) -> list[TokenEvent]:
    """The token events of ``request_ids`` from Kafka, read from the beginning.

    Reads until ``until(events)`` holds (default: every request has a terminal event),
    then ``settle_s`` more (to catch duplicates that should not exist).
    """
    ids = set(request_ids)

    def all_terminal(evs: list[TokenEvent]) -> bool:
        return ids <= {e.request_id for e in evs if e.kind.is_terminal}

    cond = until or all_terminal

    async def run() -> list[TokenEvent]:
        from tokenmill import kafka

        consumer = kafka.consumer(bootstrap, TOKEN_EVENTS_TOPIC, group_id=f"test-{uuid.uuid4().hex}")
        await kafka.start(consumer, "test consumer")
        found: list[TokenEvent] = []
        try:
            deadline = time.monotonic() + timeout_s
            settled_at: float | None = None
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for rec in records:
                        ev = decode(TokenEvent, rec.value)
                        if ev.request_id in ids:
                            found.append(ev)
                if settled_at is None and cond(found):
                    settled_at = time.monotonic()
                if settled_at is not None and time.monotonic() - settled_at >= settle_s:
                    return found
            raise AssertionError(
                f"timed out collecting events; got {[(e.request_id[-6:], e.kind.value) for e in found]}"
            )
        finally:
            await consumer.stop()

    return asyncio.run(run())


def kinds(events: list[TokenEvent], request_id: str) -> list[EventKind]:
    return [e.kind for e in sorted((e for e in events if e.request_id == request_id), key=lambda e: (e.attempt, e.seq))]


def require_vllm() -> None:
    """vLLM must be importable: outside CI a missing one skips, in CI (``CI`` set) it fails."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM is missing in CI: {exc}")
        pytest.skip(f"vLLM is not installed: {exc}")
