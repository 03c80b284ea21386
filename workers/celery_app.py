"""The Celery app: Redis broker, one queue per worker pool, slices of requests per message.

Delivery settings, and why (see ``docs/workers.md`` for the whole argument):

* ``task_acks_late=True`` — a message is acked only after every request in it has a
  stored outcome, so a worker that dies mid-request leaves it unacked.
* ``worker_prefetch_multiplier=1`` — a worker reserves no more messages than it has
  task threads; the scheduler sends only into free capacity, so queues stay short.
* ``visibility_timeout`` **short** (60 s default; tests use ~2 s) with
  ``unacked_restore_interval`` / ``throttle`` tuned so sweeps run every few seconds —
  a SIGKILLed worker's messages are handed out again within about
  ``visibility_timeout + restore interval``. A running worker renews its messages'
  delivery time every second (:func:`tokenmill.workers.lease.renew_visibility`), so a
  request longer than the visibility timeout is *not* delivered again while its
  worker lives; a per-request lease stops a second run even if that ever fails.
* ``task_reject_on_worker_lost=True`` — with a prefork/solo child that dies, requeue
  the message instead of acking it as failed (our worker runs a threads pool, where
  a lost worker is a lost process and the visibility sweep brings the message back).
* Redis priorities: ``priority_steps`` 0–9, ``queue_order_strategy=priority``
  (0 is highest); interactive → 0, standard → 3, batch → 6.
* Task events on (``worker_send_task_events``, ``task_send_sent_event``) for Flower.
* The result backend is unused: outcomes go to tokenmill's result store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from celery import Celery
from pydantic import TypeAdapter

from ..wire import Dispatch

__all__ = [
    "TASK_NAME",
    "UNACKED_INDEX_KEY",
    "celery_priority",
    "create_app",
    "queue_name",
    "send_slice",
    "send_slice_json",
]

#: the task the scheduler sends: ``run_slice(dispatches)``, a JSON array of Dispatch
#: as a string (or, from older senders, a list of dicts)
TASK_NAME = "tokenmill.run_slice"
SLICE: TypeAdapter[list[Dispatch]] = TypeAdapter(list[Dispatch])
QUEUE_PREFIX = "tokenmill.pool."
#: kombu's index of unacked messages (set explicitly so the host can renew it)
UNACKED_INDEX_KEY = "unacked_index"
DEFAULT_VISIBILITY_TIMEOUT_S = 60.0


def queue_name(pool: str) -> str:
    """The Celery queue of worker pool ``pool``."""
    return QUEUE_PREFIX + pool


def celery_priority(rank: int) -> int:
    """Celery priority (0 highest) of a :attr:`~tokenmill.wire.Priority.rank`."""
    return min(9, max(0, rank * 3))


def create_app(
    redis_url: str,
    *,
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
    main: str = "tokenmill",
) -> Celery:
    """A Celery app on the Redis broker at ``redis_url``, with ``run_slice`` registered."""
    restore_every = max(1, min(5, int(visibility_timeout_s / 2)))
    app = Celery(main, broker=redis_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "visibility_timeout": visibility_timeout_s,
            "unacked_index_key": UNACKED_INDEX_KEY,
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=queue_name("default"),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    from .tasks import register_tasks

    register_tasks(app)
    return app


def send_slice(app: Celery, pool: str, dispatches: Sequence[Dispatch], *, priority: int | None = None) -> str:
    """Send one slice of dispatches to ``pool``'s queue; returns the Celery task id.

    ``priority`` defaults to the most urgent request's class (:func:`celery_priority`).
    """
    if not dispatches:
        raise ValueError("an empty slice")
    if priority is None:
        priority = celery_priority(min(d.request.priority.rank for d in dispatches))
    payload = SLICE.dump_json(list(dispatches), exclude_none=True)
    return send_slice_json(app, pool, payload, priority)


def send_slice_json(app: Celery, pool: str, payload: bytes, priority: int) -> str:
    """Send a slice already serialized as a JSON array of Dispatch objects.

    The slice travels as one JSON string argument: Celery's JSON encoding of a string
    is one C-level escape, where a list of nested dicts is walked object by object on
    both ends, and the worker validates the whole string in one pydantic call.
    """
    # argsrepr: task events (Flower, any event consumer) show a size, never the prompts.
    result = app.send_task(
        TASK_NAME, args=[payload.decode()], queue=queue_name(pool), priority=priority,
        argsrepr=f"<slice: {len(payload)} bytes>", kwargsrepr="{}",
    )
    return str(result.id)


def _default_app() -> Celery:
    """The app for ``celery -A tokenmill.workers.celery_app`` (Flower, inspect)."""
    url = os.environ.get("TOKENMILL_REDIS_URL")
    if not url:
        from ..config.settings import load_settings

        settings = load_settings()
        url = settings.redis_url
        if not url:
            from ..stack import endpoints

            url = endpoints(settings).redis_url
    return create_app(url)


_app: Celery | None = None


def __getattr__(name: str) -> Any:  # PEP 562: ``-A tokenmill.workers.celery_app:app``
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = _default_app()
        return _app
    raise AttributeError(name)
