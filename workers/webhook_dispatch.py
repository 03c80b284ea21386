"""The delivery task on its own Celery queue, and the dispatcher that sends it.

The dispatcher takes due pending deliveries from the ledger
(:func:`~tokenmill.ledger.lease_due_webhooks` pushes their due time a lease ahead) and
sends ``tokenmill.deliver_webhook(id, attempt)`` to ``tokenmill.webhooks``: slow or dead
receivers occupy only the webhook worker's threads, never an inference worker. Retries
are due times in the ledger rather than Celery countdowns, which on Redis would be
redelivered after the visibility timeout and lost on a restart; a sender that dies
loses nothing, since the delivery falls due again when its lease ends.

Copies: run any number. The lease is one atomic statement per poll (``SELECT … FOR
UPDATE SKIP LOCKED`` then the due time pushed ahead, in one transaction; SQLite's
``BEGIN IMMEDIATE`` serializes it), so two dispatchers never send one delivery at once,
and the task's lock per message and attempt number stop any late duplicate. Each copy
announces itself as ``webhooks`` (``tokenmill status``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from .. import presence
from ..config.settings import load_settings
from ..ledger import lease_due_webhooks, transaction
from ..logs import get_logger
from ..redis_client import async_redis
from .webhook_attempt import Deliverer

__all__ = ["QUEUE", "TASK_NAME", "Dispatcher", "register_webhook_tasks", "send_delivery"]

log = get_logger(__name__)

TASK_NAME = "tokenmill.deliver_webhook"
QUEUE = "tokenmill.webhooks"
#: the service name copies announce themselves under
SERVICE = "webhooks"


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
                made.append(deliverer() if deliverer is not None
                            else Deliverer.create(load_settings(), str(app.conf.broker_url)))
            return made[0]

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def deliver_webhook(webhook_id: str, attempt: int) -> str | None:
        return get().deliver(webhook_id, attempt)


def send_delivery(app: Celery, webhook_id: str, attempt: int) -> None:
    app.send_task(TASK_NAME, args=[webhook_id, attempt], queue=QUEUE)


class Dispatcher:
    """Sends due deliveries to the queue, polling the ledger."""

    def __init__(self, app: Celery, factory: sessionmaker[Session], *, lease_s: float,
                 poll_s: float = 0.25) -> None:
        self.app = app
        self.factory = factory
        self.lease_s = lease_s
        self.poll_s = poll_s
        #: deliveries this copy has sent to the queue
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        # The Celery broker is the stack's Redis: announce this copy there.
        client = async_redis(str(self.app.conf.broker_url))
        quiet = asyncio.Event()
        announcing = asyncio.create_task(presence.run_presence(
            client, SERVICE, quiet, lambda: ("copy", {"sent": self.sent})))
        try:
            await self._dispatch(stop)
        finally:
            quiet.set()
            await announcing
            await client.aclose()

    async def _dispatch(self, stop: asyncio.Event) -> None:
        interval = self.poll_s
        while not stop.is_set():
            due: list[tuple[str, int]] = []
            try:
                with transaction(self.factory) as session:
                    due = lease_due_webhooks(session, datetime.now(UTC), lease_s=self.lease_s)
                for webhook_id, attempts in due:
                    send_delivery(self.app, webhook_id, attempts + 1)
                    self.sent += 1
            except Exception as exc:  # noqa: BLE001 - keep dispatching through hiccups
                log.error("webhook dispatch failed", error=repr(exc))
            # Poll often while there is traffic, gently (up to 1 s) while there is none.
            interval = self.poll_s if due else min(1.0, interval * 1.5)
            await asyncio.sleep(interval)
