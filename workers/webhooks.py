"""Webhooks: recorded in the ledger, delivered by a Celery task on their own queue.

The flow, and why:

1. Whoever sees an event (the batch runner for batches, :class:`RequestWatcher` for
   requests submitted with ``webhook=``) records it with :func:`enqueue_event` in the
   same ledger transaction as the change it reports. The message id (``webhook-id``)
   is derived from the event, so recording it twice records it once.
2. A dispatcher takes due pending deliveries (:func:`~tokenmill.ledger.lease_due_webhooks`
   pushes their due time a lease ahead) and sends ``tokenmill.deliver_webhook(id,
   attempt)`` to the ``tokenmill.webhooks`` queue: slow or dead receivers occupy only
   the webhook worker's threads, never an inference worker.
3. The task makes *one* attempt, under a Redis lock per message (two copies of a task
   never post at once) and only if the delivery still waits for that attempt (a copy
   sent again after the attempt was made does nothing). It signs the body per
   Standard Webhooks (:mod:`.webhook_signing`), posts it with the configured timeout,
   records the attempt, and either marks the delivery ``delivered``, schedules the
   next attempt (exponential backoff with full jitter) or, after ``max_attempts``,
   marks it ``dead`` (``tokenmill webhooks --failed`` lists those). Retries are due
   times in the ledger rather than Celery countdowns, which on Redis would be
   redelivered after the visibility timeout and lost on a restart.

Where a webhook may go is :mod:`.webhook_targets`' one policy, checked at submission
and again at every attempt: the host name is looked up once per attempt and the POST
goes to the address checked (:func:`~.webhook_targets.pin_target`), with the name as
``Host`` and TLS server name. A refused target is dead at once; a name that does not
resolve is a failed attempt, retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import redis

from .. import loops
from ..errors import ValidationError
from ..logs import get_logger
from ..redis_client import async_redis
from . import keys
from .webhook_signing import signed_headers
from .webhook_targets import Resolver, TargetRefused, TargetUnresolved, pin_target

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from ..config.settings import Settings

__all__ = [
    "QUEUE",
    "TASK_NAME",
    "enqueue_event",
    "register_webhook_tasks",
    "run_webhook_worker",
    "webhook_id_for",
]

log = get_logger(__name__)

TASK_NAME = "tokenmill.deliver_webhook"
QUEUE = "tokenmill.webhooks"
USER_AGENT = "tokenmill-webhooks/1"
#: longest pause between two attempts
BACKOFF_CAP_S = 3600.0
#: Redis hash of plain requests that asked for a webhook: request id -> {tenant, url}
WATCH_KEY = keys.PREFIX + "webhook-watch"
WATCH_GROUP = "tokenmill-webhook-watch"


def webhook_id_for(key: str) -> str:
    """The stable message id of an event (``key``: e.g. ``batch_…:completed``)."""
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def enqueue_event(
    session: Session, *, key: str, tenant: str, url: str, event_type: str, data: dict[str, Any]
) -> bool:
    """Record a webhook message in the caller's transaction; True if it is new."""
    from ..ledger import enqueue_webhook

    now = datetime.now(UTC)
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    return enqueue_webhook(
        session, webhook_id=webhook_id_for(key), tenant=tenant, url=url,
        event_type=event_type, payload=payload, at=now,
    )


def backoff_s(attempt: int, base_s: float, *, cap_s: float = BACKOFF_CAP_S, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff after failed attempt ``attempt`` (1-based)."""
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 60))
    return (rng or random).uniform(0, ceiling)


# -- delivering ------------------------------------------------------------------------


@dataclass
class Deliverer:
    """One attempt at a time; shared by the worker's task threads."""

    settings: Settings
    factory: sessionmaker[Session]
    redis: redis.Redis
    http: httpx.Client
    #: the host name lookup (``socket.getaddrinfo``; tests give names their answers)
    resolve: Resolver = socket.getaddrinfo

    @classmethod
    def create(cls, settings: Settings, redis_url: str) -> Deliverer:
        from ..ledger import shared_factory

        return cls(
            settings=settings,
            factory=shared_factory(settings.ledger_url),
            redis=redis.Redis.from_url(redis_url),
            http=httpx.Client(timeout=settings.webhooks.timeout_s, follow_redirects=False),
        )

    def deliver(self, webhook_id: str, attempt: int) -> str | None:
        """Make attempt ``attempt`` of a delivery; returns the delivery's status after
        it, or None when this copy of the task had nothing to do."""
        from ..ledger import DeliveryStatus, get_webhook, record_webhook_attempt, transaction

        cfg = self.settings.webhooks
        lock, token = keys.PREFIX + "webhook-lock:" + webhook_id, uuid.uuid4().hex
        if not self.redis.set(lock, token, nx=True, ex=int(cfg.timeout_s) + 30):
            return None  # another copy is attempting it right now
        try:
            with transaction(self.factory) as session:
                d = get_webhook(session, webhook_id)
                status, attempts, url, tenant, payload = d.status, d.attempts, d.url, d.tenant, d.payload
            if status is not DeliveryStatus.pending or attempts + 1 != attempt:
                return None
            code, error, permanent, took_ms = self._post(webhook_id, url, tenant, payload)
            now = datetime.now(UTC)
            next_at = None
            if code is not None and 200 <= code < 300:
                new = DeliveryStatus.delivered
            elif permanent or attempt >= cfg.max_attempts:
                new = DeliveryStatus.dead
            else:
                new = DeliveryStatus.pending
                next_at = now + timedelta(seconds=backoff_s(attempt, cfg.backoff_base_s))
            with transaction(self.factory) as session:
                record_webhook_attempt(
                    session, webhook_id, attempt, status=new, status_code=code, error=error,
                    duration_ms=took_ms, at=now, next_attempt_at=next_at,
                )
            log.info("webhook attempt", webhook_id=webhook_id, attempt=attempt, status=new.value,
                     status_code=code, error=error)
            return new.value
        finally:
            # Release only our own lock (it may have expired and been taken since).
            if self.redis.get(lock) == token.encode():
                self.redis.delete(lock)

    def _post(
        self, webhook_id: str, url: str, tenant: str, payload: dict[str, Any]
    ) -> tuple[int | None, str | None, bool, float]:
        """``(status code, error, permanent?, milliseconds)`` of one POST."""
        started = time.monotonic()
        try:
            target = pin_target(url, self.settings.webhooks, resolve=self.resolve)
            t = self.settings.tenants.get(tenant)
            if t is None or t.webhook_secret is None:
                raise TargetRefused(f"tenant {tenant!r} has no webhook_secret configured")
            body = json.dumps(payload, separators=(",", ":")).encode()
            headers = signed_headers(t.webhook_secret.get_secret_value(), webhook_id, body)
            headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
            headers.update(target.headers)
            resp = self.http.post(target.url, content=body, headers=headers,
                                  extensions=target.extensions)
        except ValidationError as exc:
            return None, str(exc), True, (time.monotonic() - started) * 1000
        except TargetUnresolved as exc:
            return None, str(exc), False, (time.monotonic() - started) * 1000
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500], False, (time.monotonic() - started) * 1000
        took = (time.monotonic() - started) * 1000
        error = None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"
        return resp.status_code, error, False, took


def register_webhook_tasks(app: Celery, deliverer: Callable[[], Deliverer] | None = None) -> None:
    """Register ``tokenmill.deliver_webhook(webhook_id, attempt)`` on ``app``.

    ``deliverer`` makes the process's :class:`Deliverer` on first use (default: from
    the loaded settings and the app's broker URL).
    """
    made: list[Deliverer] = []
    made_lock = threading.Lock()

    def get() -> Deliverer:
        with made_lock:
            if not made:
                if deliverer is not None:
                    made.append(deliverer())
                else:
                    from ..config.settings import load_settings

                    made.append(Deliverer.create(load_settings(), str(app.conf.broker_url)))
            return made[0]

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def deliver_webhook(webhook_id: str, attempt: int) -> str | None:
        return get().deliver(webhook_id, attempt)


def send_delivery(app: Celery, webhook_id: str, attempt: int) -> None:
    app.send_task(TASK_NAME, args=[webhook_id, attempt], queue=QUEUE)


# -- the service: dispatcher and request watcher -----------------------------------------


class WebhookService:
    """Sends due deliveries to the queue, and records webhooks of finished requests.

    Runs on its own asyncio loop (:meth:`run`), beside the webhook worker's threads.
    """

    def __init__(self, settings: Settings, app: Celery, *, kafka_bootstrap: str | None,
                 redis_url: str, poll_s: float = 0.25) -> None:
        from ..ledger import shared_factory

        self.settings = settings
        self.app = app
        self.kafka_bootstrap = kafka_bootstrap
        self.redis_url = redis_url
        self.poll_s = poll_s
        self.factory = shared_factory(settings.ledger_url)
        # Long enough for a queued task to be taken and make its attempt.
        self.lease_s = settings.webhooks.timeout_s * 2 + 30

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._dispatch(stop), name="webhook-dispatch")]
        if self.kafka_bootstrap:
            tasks.append(asyncio.create_task(self._watch(stop), name="webhook-watch"))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch(self, stop: asyncio.Event) -> None:
        from ..ledger import lease_due_webhooks, transaction

        interval = self.poll_s
        while not stop.is_set():
            due: list[tuple[str, int]] = []
            try:
                with transaction(self.factory) as session:
                    due = lease_due_webhooks(session, datetime.now(UTC), lease_s=self.lease_s)
                for webhook_id, attempts in due:
                    send_delivery(self.app, webhook_id, attempts + 1)
            except Exception as exc:  # noqa: BLE001 - keep dispatching through hiccups
                log.error("webhook dispatch failed", error=repr(exc))
            # Poll often while there is traffic, gently (up to 1 s) while there is none.
            interval = self.poll_s if due else min(1.0, interval * 1.5)
            await asyncio.sleep(interval)

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._watch_once(stop)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the service
                log.error("webhook watcher failed; restarting", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _watch_once(self, stop: asyncio.Event) -> None:
        """Requests submitted with ``webhook=``: note them as they are published, and
        record their webhook once their result is stored."""
        from .. import kafka, wire

        client = async_redis(self.redis_url)
        assert self.kafka_bootstrap is not None
        await kafka.ensure_topics(self.kafka_bootstrap)
        # Only notes which requests have webhooks: a long poll spares the broker's CPU.
        consumer = kafka.consumer(self.kafka_bootstrap, *wire.REQUEST_TOPICS, group_id=WATCH_GROUP,
                                  fetch_max_wait_ms=250)  # fmt: skip
        await kafka.start(consumer, "webhook watcher")
        try:
            while not stop.is_set():
                got = await consumer.getmany(timeout_ms=100, max_records=5000)
                noted: dict[str, str] = {}
                for recs in got.values():
                    for rec in recs:
                        req = _webhook_request(rec.value)
                        if req is not None:
                            noted[req.id] = json.dumps({"tenant": req.tenant, "url": req.webhook_url})
                if noted:
                    await client.hset(WATCH_KEY, mapping=noted)  # type: ignore[misc]
                if got:
                    await consumer.commit()
                await self._finished_requests(client)
        finally:
            await consumer.stop()
            await client.aclose()

    async def _finished_requests(self, client: Any) -> None:
        from .. import wire
        from ..ledger import transaction

        watched = await client.hgetall(WATCH_KEY)
        if not watched:
            return
        ids = [k.decode() for k in watched]
        raws = await client.mget([keys.result(r) for r in ids])
        done = [(rid, raw) for rid, raw in zip(ids, raws) if raw is not None]
        if not done:
            return
        with transaction(self.factory) as session:
            for rid, raw in done:
                result = wire.decode(wire.Result, raw)
                target = json.loads(watched[rid.encode()])
                enqueue_event(
                    session, key=f"{rid}:request.completed", tenant=target["tenant"], url=target["url"],
                    event_type="request.completed", data=_request_data(result),
                )
        await client.hdel(WATCH_KEY, *[rid for rid, _ in done])


def _webhook_request(raw: bytes) -> Any:
    from .. import wire

    if b'"webhook_url"' not in raw:  # absent fields are not serialized: most requests
        return None
    try:
        req = wire.decode(wire.InferenceRequest, raw)
    except wire.SchemaError:
        return None
    return req if req.webhook_url and req.batch_id is None else None


def _request_data(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": result.request_id, "object": "request", "status": result.status.value,
                            "model": result.model}
    if result.usage is not None:
        data["usage"] = {"prompt_tokens": result.usage.prompt_tokens,
                         "completion_tokens": result.usage.completion_tokens}
    if result.error is not None:
        data["error"] = {"code": result.error.code, "message": result.error.message}
    return data


def run_webhook_worker(settings: Settings, *, concurrency: int = 8, loglevel: str = "INFO") -> int:
    """The webhook process: a Celery worker (threads) on ``tokenmill.webhooks`` and the
    :class:`WebhookService` loop beside it. Returns the worker's exit code."""
    from .celery_app import create_app
    from .worker import resolve_urls

    kafka_bootstrap, redis_url = resolve_urls(settings)
    app = create_app(redis_url)
    register_webhook_tasks(app, lambda: Deliverer.create(settings, redis_url))
    service = WebhookService(settings, app, kafka_bootstrap=kafka_bootstrap, redis_url=redis_url)
    loop = loops.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(service.run(stop),),
                              name="webhook-service", daemon=True)
    thread.start()
    worker = app.Worker(
        hostname=f"webhooks@{socket.gethostname()}-{os.getpid()}",
        queues=[QUEUE], pool_cls="threads", concurrency=concurrency, loglevel=loglevel,
        task_events=True, without_mingle=True, without_gossip=True,
    )
    try:
        worker.start()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
    return int(worker.exitcode or 0)
