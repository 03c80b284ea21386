"""The trusted producer: publishing straight to Kafka, for services inside the cluster.

Tenants never use this path: they reach tokenmill through the gateway
(:class:`tokenmill.Client`), which checks their API key and stamps their tenant on
every request. A :class:`TrustedProducer` is told its tenant and believes it; it checks
no key. Only services inside the cluster may use it (benchmarks, in-cluster
pipelines): in a deployment, broker ACLs restrict the request topics to the gateway and
such producers, and Redis (results) is not reachable from outside.

A request is validated (:mod:`.requests`), then published to
``tokenmill.requests.<priority>`` keyed by tenant; ``submit`` returns once the broker
has acknowledged it (``acks=all``). Results come back through Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

from .. import kafka, wire
from ..config import Settings, load_settings
from ..errors import ValidationError
from ..redis_client import async_redis
from ..stack import endpoints
from ..workers.webhook_watch import WATCH_KEY, watch_notes
from .client import RequestTimeout
from .requests import build_request
from .waiter import ResultWaiter

__all__ = ["TrustedProducer"]


class TrustedProducer:
    """Publish ``tenant``'s requests to Kafka and wait for their results in Redis.

    Only for services inside the cluster (see the module docstring): the tenant is
    taken as given, no API key is checked.

    Parameters:
        tenant: a configured tenant name; every request is published as this tenant.
        settings: defaults to :func:`load_settings` (models, tenants, services).
        kafka_bootstrap, redis_url: default to the configured or local-stack services.
    """

    def __init__(
        self,
        tenant: str,
        *,
        settings: Settings | None = None,
        kafka_bootstrap: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        if tenant not in self.settings.tenants:
            raise ValidationError(f"tenant: unknown tenant {tenant!r}", field="tenant")
        self.tenant = tenant
        # A stack restarted meanwhile may serve Redis elsewhere: re-read its address
        # (only where it came from the stack, not from the caller).
        reconnect = None if redis_url else lambda: async_redis(endpoints(self.settings).redis_url)
        if kafka_bootstrap is None or redis_url is None:
            ep = endpoints(self.settings)
            kafka_bootstrap = kafka_bootstrap or ep.kafka_bootstrap
            redis_url = redis_url or ep.redis_url
        self._producer = kafka.producer(kafka_bootstrap)
        self._redis = async_redis(redis_url)
        self._waiter = ResultWaiter(self._redis, tenant, reconnect=reconnect)
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if not self._started:
            await kafka.start(self._producer, "trusted producer")
            self._started = True

    async def close(self) -> None:
        await self._waiter.close()
        if self._started:
            await self._producer.stop()
            self._started = False
        await self._redis.aclose()

    def build(self, model: str, **kwargs: Any) -> wire.InferenceRequest:
        """Validate and build a request without sending it (raises ValidationError);
        the arguments are :meth:`tokenmill.Client.submit`'s."""
        return build_request(self.settings, tenant=self.tenant, model=model, **kwargs)

    async def submit_many(self, requests: Iterable[wire.InferenceRequest]) -> list[str]:
        """Publish built requests together; returns their ids once the broker
        acknowledged all.

        Raises:
            ValidationError: a request of another tenant (nothing was sent).
            StackError: the broker did not take them.
        """
        await self.start()
        reqs = list(requests)
        for req in reqs:
            if req.tenant != self.tenant:
                raise ValidationError(f"tenant: request {req.id} is for another tenant", field="tenant")
        notes = watch_notes(reqs)
        if notes:  # before publishing: see workers.webhook_watch
            await self._redis.hset(WATCH_KEY, mapping=notes)  # type: ignore[arg-type]  # redis-py: invariant keys
        await kafka.publish(self._producer, [(r.priority.topic, r.tenant.encode(), r.to_bytes()) for r in reqs])
        return [req.id for req in reqs]

    async def result(self, request_id: str, timeout: float = 600.0) -> wire.Result:
        """Wait for the request's result.

        Raises:
            RequestTimeout: none within ``timeout`` seconds.
        """
        found = await self._waiter.wait(request_id, timeout)
        if found is None:
            raise RequestTimeout(f"request {request_id}: no result within {timeout:g}s")
        return found
