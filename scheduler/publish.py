"""A Celery publish, captured as the Redis commands it would run instead of run.

The scheduler's dispatch must be fenced: a leader that lost its lease (paused past the
TTL, then resumed) must publish nothing. A check before a publish leaves a window
between the two; so the slice's Celery message is built by Celery and kombu as usual,
but kombu's last step — the ``LPUSH`` onto the queue's Redis list (and the ``PUBLISH``
of the ``task-sent`` event) — is captured here and run by the scheduler's fenced Lua
script, in the same atomic call that checks the lease and marks the requests
dispatched. Either all of it happens, or none.

Only kombu's Redis transport is supported (the project's only broker): its channel's
``_put`` / ``_put_fanout`` are the two places that write a message to Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.utils.json import dumps

from ..workers.celery_app import TASK_NAME, queue_name
from .errors import SchedulerError

__all__ = ["Command", "SlicePublisher"]


@dataclass(frozen=True, slots=True)
class Command:
    """One Redis write of a publish: ``LPUSH key payload`` or ``PUBLISH key payload``."""

    name: str
    key: str
    payload: bytes | str


class SlicePublisher:
    """Builds ``run_slice`` task messages for a pool and returns their Redis commands.

    Not thread-safe; one per scheduler (it owns a kombu connection for routing reads:
    the exchange's bindings and queue declarations still go to Redis directly).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.connection = app.connection_for_write()
        channel: Any = self.connection.default_channel
        if not hasattr(channel, "_q_for_pri"):
            raise SchedulerError(
                f"fenced dispatch needs Celery's Redis broker, not {type(channel).__module__}"
            )
        self._captured: list[Command] | None = None
        channel._put = self._capture_put(channel)
        channel._put_fanout = self._capture_fanout(channel)
        self.producer = app.amqp.Producer(channel)

    def _collect(self, command: Command) -> None:
        if self._captured is None:
            raise SchedulerError("a publish outside SlicePublisher.commands (would be lost)")
        self._captured.append(command)

    def _capture_put(self, channel: Any) -> Callable[..., None]:
        def put(queue: str, message: dict[str, Any], **_: Any) -> None:
            pri = channel._get_message_priority(message, reverse=False)
            self._collect(Command("LPUSH", channel._q_for_pri(queue, pri), dumps(message)))

        return put

    def _capture_fanout(self, channel: Any) -> Callable[..., None]:
        def put_fanout(exchange: str, message: dict[str, Any], routing_key: str, **_: Any) -> None:
            payload = dumps(message)
            for topic in channel._get_publish_topics(exchange, routing_key):
                self._collect(Command("PUBLISH", topic, payload))

        return put_fanout

    def commands(self, pool: str, payload: bytes, priority: int) -> list[Command]:
        """The Redis commands that send one slice (a JSON array of Dispatch) to ``pool``.

        The same message :func:`~tokenmill.workers.celery_app.send_slice_json` sends.
        """
        self._captured = []
        try:
            self.app.send_task(
                TASK_NAME, args=[payload.decode()], queue=queue_name(pool), priority=priority,
                argsrepr=f"<slice: {len(payload)} bytes>", kwargsrepr="{}", producer=self.producer,
            )  # fmt: skip
            out, self._captured = self._captured, None
        finally:
            self._captured = None
        if not any(c.name == "LPUSH" for c in out):
            raise SchedulerError(f"no queue is bound for pool {pool!r}: the slice would be lost")
        return out

    def close(self) -> None:
        self.connection.release()
