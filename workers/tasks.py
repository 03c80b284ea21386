"""The Celery task ``tokenmill.run_slice``: several requests per message.

``run_slice(dispatches)`` takes a list of :class:`~tokenmill.wire.Dispatch` as JSON
dicts, hands them all to the worker's :class:`~tokenmill.workers.host.EngineHost`
(attached to the app as ``app.tokenmill_host`` by the worker process) and returns
once every request has a stored outcome; only then is the message acked.

Engine failures are outcomes (a ``failed`` result and event), not task failures. A
task fails only when Redis or Kafka does: then the message is requeued (``Reject``)
after a short pause, and the requests already settled are skipped on redelivery.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pydantic
from aiokafka.errors import KafkaError
from celery import Celery, Task
from celery.exceptions import Reject
from redis.exceptions import RedisError

from ..errors import StackError
from ..logs import get_logger
from ..wire import Dispatch, describe_validation_error
from .celery_app import SLICE, TASK_NAME

__all__ = ["register_tasks"]

log = get_logger(__name__)

#: pause before requeueing a slice whose infrastructure failed
REQUEUE_PAUSE_S = 1.0


def _read_slice(
    dispatches: str | list[Any], host: Any, report: dict[str, str], task_id: str | None
) -> list[Dispatch]:
    """The valid dispatches of a slice; each invalid one that names a request is
    failed through ``host`` (and put in ``report``), the others only logged with the
    Celery task id of the message they came in."""
    if isinstance(dispatches, str):
        try:
            return SLICE.validate_json(dispatches)  # the common case: one pydantic call
        except pydantic.ValidationError:
            try:
                dispatches = json.loads(dispatches)
            except ValueError as exc:
                log.error("unreadable slice", task_id=task_id, reason=f"not JSON: {exc}")
                return []
    if not isinstance(dispatches, list):
        log.error("unreadable slice", task_id=task_id,
                  reason=f"a JSON {type(dispatches).__name__}, not a list of dispatches")  # fmt: skip
        return []
    valid: list[Dispatch] = []
    for raw in dispatches:
        try:
            valid.append(Dispatch.model_validate(raw))
        except pydantic.ValidationError as exc:
            reason = describe_validation_error(exc)
            rid = host.report_invalid(raw, reason)
            log.error("invalid dispatch", task_id=task_id, request_id=rid, reason=reason)
            if rid:
                report[rid] = "failed"
    return valid


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
    def run_slice(self: Task, dispatches: str | list[dict[str, Any]]) -> dict[str, str]:
        host = getattr(self.app, "tokenmill_host", None)
        if host is None:
            # Not a tokenmill worker process (a misconfigured consumer): put it back.
            raise Reject("no engine host in this worker", requeue=True)
        report: dict[str, str] = {}
        valid = _read_slice(dispatches, host, report, self.request.id)
        tag = (self.request.properties or {}).get("delivery_tag")
        try:
            outcomes = host.run_slice(valid, delivery_tag=tag)
        except (StackError, OSError, RedisError, KafkaError) as exc:
            log.error("slice failed, requeueing", error=repr(exc))
            time.sleep(REQUEUE_PAUSE_S)
            raise Reject(repr(exc), requeue=True) from exc
        report.update({o.request_id: o.status for o in outcomes})
        return report
