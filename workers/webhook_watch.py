"""The request watcher: requests submitted with ``webhook=`` get a ``request.completed``
webhook once their result is stored.

It reads the request topics only to note which requests asked for a webhook (request
id → tenant and URL, in a Redis hash), and records the webhook of each noted request
whose result has appeared in the result store.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from .. import kafka, wire
from ..ledger import transaction
from ..logs import get_logger
from ..redis_client import async_redis
from . import keys
from .webhook_events import enqueue_event

__all__ = ["WATCH_KEY", "RequestWatcher"]

log = get_logger(__name__)

#: Redis hash of plain requests that asked for a webhook: request id -> {tenant, url}
WATCH_KEY = keys.PREFIX + "webhook-watch"
WATCH_GROUP = "tokenmill-webhook-watch"


class RequestWatcher:
    def __init__(self, factory: sessionmaker[Session], *, kafka_bootstrap: str, redis_url: str) -> None:
        self.factory = factory
        self.kafka_bootstrap = kafka_bootstrap
        self.redis_url = redis_url

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._run_once(stop)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the service
                log.error("webhook watcher failed; restarting", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _run_once(self, stop: asyncio.Event) -> None:
        client = async_redis(self.redis_url)
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
                    await client.hset(WATCH_KEY, mapping=noted)  # type: ignore[arg-type]  # redis-py: invariant keys
                if got:
                    await consumer.commit()
                await self._finished_requests(client)
        finally:
            await consumer.stop()
            await client.aclose()

    async def _finished_requests(self, client: Any) -> None:
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


def _webhook_request(raw: bytes) -> wire.InferenceRequest | None:
    if b'"webhook_url"' not in raw:  # absent fields are not serialized: most requests
        return None
    try:
        req = wire.decode(wire.InferenceRequest, raw)
    except wire.SchemaError:
        return None
    return req if req.webhook_url and req.batch_id is None else None


def _request_data(result: wire.Result) -> dict[str, Any]:
    data: dict[str, Any] = {"id": result.request_id, "object": "request", "status": result.status.value,
                            "model": result.model}
    if result.usage is not None:
        data["usage"] = {"prompt_tokens": result.usage.prompt_tokens,
                         "completion_tokens": result.usage.completion_tokens}
    if result.error is not None:
        data["error"] = {"code": result.error.code, "message": result.error.message}
    return data
