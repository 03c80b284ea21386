"""Webhooks: recorded in the ledger, delivered by a Celery task on their own queue.

The flow, one module per step:

1. Whoever sees an event (the batch runner for batches, the request watcher,
   :mod:`.webhook_watch`, for requests submitted with ``webhook=``) records it with
   :func:`enqueue_event` (:mod:`.webhook_events`) in the same ledger transaction as the
   change it reports. The message id (``webhook-id``) is derived from the event, so
   recording it twice records it once, and every retry carries the same id.
2. A dispatcher (:mod:`.webhook_dispatch`) leases due pending deliveries and sends
   ``tokenmill.deliver_webhook(id, attempt)`` to the ``tokenmill.webhooks`` queue.
3. The task makes *one* attempt (:mod:`.webhook_attempt`) under a Redis lock per
   message, only if the delivery still waits for that attempt: it signs the body per
   Standard Webhooks (:mod:`.webhook_signing`), POSTs it under a total deadline with a
   capped response body (:mod:`.webhook_post`) that ends before the lock does, records
   the attempt, and marks the delivery ``delivered``, schedules the next attempt
   (exponential backoff with full jitter) or, after ``max_attempts``, marks it ``dead``
   (``tokenmill webhooks --failed`` lists those).

Where a webhook may go is :mod:`.webhook_targets`' one policy, checked at submission
and again at every attempt, on the address the attempt connects to.

This module is the entry point: recording events, and :func:`run_webhook_worker`, the
process that ``tokenmill up`` starts as ``webhooks``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading

from .. import loops
from ..config.settings import Settings
from ..ledger import shared_factory
from ..logs import get_logger
from .celery_app import create_app
from .webhook_attempt import Deliverer, lease_s
from .webhook_dispatch import QUEUE, Dispatcher, register_webhook_tasks
from .webhook_events import enqueue_event, webhook_id_for
from .webhook_watch import RequestWatcher
from .worker import resolve_urls

__all__ = ["enqueue_event", "run_webhook_worker", "webhook_id_for"]

log = get_logger(__name__)


async def _serve(dispatcher: Dispatcher, watcher: RequestWatcher, stop: asyncio.Event) -> None:
    tasks = [asyncio.create_task(dispatcher.run(stop), name="webhook-dispatch"),
             asyncio.create_task(watcher.run(stop), name="webhook-watch")]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_webhook_worker(settings: Settings, *, concurrency: int = 8, loglevel: str = "INFO") -> int:
    """The webhook process: a Celery worker (threads) on ``tokenmill.webhooks``, and the
    dispatcher and request watcher on an event loop beside it. Returns the worker's
    exit code."""
    _, redis_url = resolve_urls(settings)
    app = create_app(redis_url)
    register_webhook_tasks(app, lambda: Deliverer.create(settings, redis_url))
    factory = shared_factory(settings.ledger_url)
    dispatcher = Dispatcher(app, factory, lease_s=lease_s(settings.webhooks))
    watcher = RequestWatcher(factory, redis_url=redis_url)
    loop = loops.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(_serve(dispatcher, watcher, stop),),
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
