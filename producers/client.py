"""The Python client: ``AsyncClient`` and its synchronous twin ``Client``.

A request is validated (:mod:`.requests`), then published to
``tokenmill.requests.<priority>`` keyed by tenant; ``submit`` returns once the broker
has acknowledged it (``acks=all``), so an accepted request is never lost. Results
and streamed deltas come back through Redis.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka.errors import KafkaError

from .. import kafka, loops, wire
from ..config import Settings, load_settings
from ..errors import StackError, TokenmillError, ValidationError
from ..redis_client import async_redis
from ..stack import endpoints
from ..workers.cancel import request_cancel_async
from ..workers.results import get_result_async, stream_events_async
from .requests import build_request
from .waiter import ResultWaiter

if TYPE_CHECKING:
    from .batches import AsyncBatches, Batches

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Handle:
    """What ``submit`` returns: enough to fetch, stream or cancel the request."""

    request_id: str
    tenant: str
    model: str
    priority: wire.Priority


class RequestTimeout(TokenmillError):
    """No result within the time asked for; the request may still complete."""


def resolve_tenant(settings: Settings, api_key: str | None, tenant: str | None) -> str:
    """The tenant an API key belongs to; a bare tenant name only where the config allows it.

    Raises:
        ValidationError: no key, or a key that matches no tenant.
    """
    api_key = api_key or os.environ.get("TOKENMILL_API_KEY")
    if api_key:
        found = settings.tenant_for_key(api_key)
        if found is None:
            raise ValidationError("api_key: matches no tenant", field="api_key")
        if tenant is not None and tenant != found:
            raise ValidationError(f"tenant: the API key belongs to another tenant than {tenant!r}", field="tenant")
        return found
    if tenant is not None and settings.allow_tenant_by_name:
        if tenant not in settings.tenants:
            raise ValidationError(f"tenant: unknown tenant {tenant!r}", field="tenant")
        return tenant
    raise ValidationError("api_key: give an API key (or TOKENMILL_API_KEY)", field="api_key")


class AsyncClient:
    """Submit requests and get their results, from asyncio code.

    Parameters:
        api_key: the tenant's key (default ``$TOKENMILL_API_KEY``).
        tenant: a tenant name instead of a key, where ``allow_tenant_by_name`` is set
            (the local stack's default).
        settings: defaults to :func:`load_settings`.
        kafka_bootstrap, redis_url: default to the configured or local-stack services.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        tenant: str | None = None,
        settings: Settings | None = None,
        kafka_bootstrap: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.tenant = resolve_tenant(self.settings, api_key, tenant)
        if kafka_bootstrap is None or redis_url is None:
            ep = endpoints(self.settings)
            kafka_bootstrap = kafka_bootstrap or ep.kafka_bootstrap
            redis_url = redis_url or ep.redis_url
        self._bootstrap = kafka_bootstrap
        self._producer = kafka.producer(kafka_bootstrap)
        self._redis = async_redis(redis_url)
        self._waiter = ResultWaiter(self._redis, self.tenant)
        self._started = False

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if not self._started:
            await kafka.start(self._producer, "client producer")
            self._started = True

    async def close(self) -> None:
        await self._waiter.close()
        if self._started:
            await self._producer.stop()
            self._started = False
        await self._redis.aclose()

    @cached_property
    def batches(self) -> AsyncBatches:
        """This tenant's batch files: ``create``, ``retrieve``, ``list``, ``cancel``, ``wait``."""
        from .batches import AsyncBatches

        return AsyncBatches(self.settings, self.tenant)

    # -- submitting ------------------------------------------------------------------

    def build(self, model: str, **kwargs: Any) -> wire.InferenceRequest:
        """Validate and build a request without sending it (raises ValidationError)."""
        return build_request(self.settings, tenant=self.tenant, model=model, **kwargs)

    async def submit(self, model: str, **kwargs: Any) -> Handle:
        """Validate and enqueue one request.

        Parameters:
            model: a configured model name.
            kwargs: ``messages`` or ``prompt``; ``max_tokens``, ``priority``
                (interactive|standard|batch), ``deadline`` (seconds from now, or a
                datetime), ``webhook`` (URL), ``stream`` (publish deltas for
                :meth:`stream`), and OpenAI sampling parameters.

        Raises:
            ValidationError: naming the offending field; nothing was sent.
        """
        return (await self.submit_many([self.build(model, **kwargs)]))[0]

    async def submit_many(self, requests: Iterable[wire.InferenceRequest]) -> list[Handle]:
        """Publish built requests together; returns once the broker acknowledged all."""
        await self.start()
        reqs = list(requests)
        for req in reqs:
            if req.tenant != self.tenant:
                raise ValidationError(f"tenant: request {req.id} is for another tenant", field="tenant")
        records = [(req.priority.topic, req.tenant.encode(), req.to_bytes()) for req in reqs]
        futures = await kafka.send_batched(self._producer, records)
        try:
            await asyncio.gather(*set(futures))
        except KafkaError as exc:
            raise StackError(f"Kafka: requests not accepted: {exc!r}") from exc
        return [Handle(r.id, r.tenant, r.model, r.priority) for r in reqs]

    # -- results -----------------------------------------------------------------------

    async def result(self, handle: Handle | str, timeout: float = 600.0) -> wire.Result:
        """Wait for the request's result.

        Raises:
            RequestTimeout: none within ``timeout`` seconds.
        """
        rid = _rid(handle)
        found = await self._waiter.wait(rid, timeout)
        if found is None:
            raise RequestTimeout(f"request {rid}: no result within {timeout:g}s")
        return self._own(found)

    async def poll(self, handle: Handle | str) -> wire.Result | None:
        found = await get_result_async(self._redis, _rid(handle))
        return self._own(found) if found else None

    async def stream(self, handle: Handle | str, timeout: float = 600.0) -> AsyncIterator[str]:
        """Yield text deltas as the engine produces them (submit with ``stream=True``)."""
        async for item in stream_events_async(self._redis, _rid(handle), timeout_s=timeout):
            if item.kind == "delta" and item.text:
                yield item.text

    async def cancel(self, handle: Handle | str) -> None:
        """Cancel a queued or running request; its result says ``cancelled``.

        The flag in Redis reaches a running request's worker; the control message
        reaches the scheduler for a queued one.
        """
        await self.start()
        rid = _rid(handle)
        await request_cancel_async(self._redis, rid)
        msg = wire.ControlMessage(kind=wire.ControlKind.cancel, request_id=rid, tenant=self.tenant)
        await self._producer.send_and_wait(wire.CONTROL_TOPIC, msg.to_bytes(), key=self.tenant.encode())

    async def map(
        self,
        model: str,
        items: Iterable[Mapping[str, Any]],
        *,
        timeout: float = 3600.0,
        progress: bool = False,
    ) -> list[wire.Result]:
        """Submit many requests (each a dict of :meth:`submit` arguments) and return their
        results in order, with an optional Rich progress bar."""
        handles = await self.submit_many([self.build(model, **dict(item)) for item in items])
        if not progress:
            return list(await asyncio.gather(*(self.result(h, timeout) for h in handles)))
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task("requests", total=len(handles))

            async def one(h: Handle) -> wire.Result:
                r = await self.result(h, timeout)
                bar.advance(task)
                return r

            return list(await asyncio.gather(*(one(h) for h in handles)))

    def _own(self, result: wire.Result) -> wire.Result:
        # Request ids are unguessable, but a tenant still never reads another's result.
        if result.tenant != self.tenant:
            raise ValidationError("request: not found for this tenant", field="request_id")
        return result


def _rid(handle: Handle | str) -> str:
    return handle if isinstance(handle, str) else handle.request_id


class Client:
    """The synchronous client: the same methods as :class:`AsyncClient`, blocking.

    It runs an event loop in a private thread, so it works inside programs that have
    no loop, and alongside ones that do.
    """

    def __init__(self, api_key: str | None = None, **kwargs: Any) -> None:
        self._loop = loops.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tokenmill-client", daemon=True)
        self._thread.start()
        self._async = self._run(_make_async(api_key, kwargs))
        self.tenant = self._async.tenant

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    @cached_property
    def batches(self) -> Batches:
        """This tenant's batch files: ``create``, ``retrieve``, ``list``, ``cancel``, ``wait``."""
        from .batches import Batches

        return Batches(self._async.settings, self.tenant)

    def build(self, model: str, **kwargs: Any) -> wire.InferenceRequest:
        return self._async.build(model, **kwargs)

    def submit(self, model: str, **kwargs: Any) -> Handle:
        return self._run(self._async.submit(model, **kwargs))

    def submit_many(self, requests: Iterable[wire.InferenceRequest]) -> list[Handle]:
        return self._run(self._async.submit_many(list(requests)))

    def result(self, handle: Handle | str, timeout: float = 600.0) -> wire.Result:
        return self._run(self._async.result(handle, timeout))

    def poll(self, handle: Handle | str) -> wire.Result | None:
        return self._run(self._async.poll(handle))

    def cancel(self, handle: Handle | str) -> None:
        self._run(self._async.cancel(handle))

    def map(self, model: str, items: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[wire.Result]:
        return self._run(self._async.map(model, list(items), **kwargs))

    def stream(self, handle: Handle | str, timeout: float = 600.0) -> Iterator[str]:
        agen = self._async.stream(handle, timeout)
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return


async def _make_async(api_key: str | None, kwargs: dict[str, Any]) -> AsyncClient:
    # Built inside the client's loop so its connections belong to that loop.
    return AsyncClient(api_key, **kwargs)
