"""The stack's branch of the error tree: a service that requests depend on is gone.

:class:`ServiceUnavailable` is a :class:`~tokenmill.errors.StackError` that names the
service (``Redis``, ``Kafka``) and says what it means for the caller in words safe to
show to a tenant; the library's own error (addresses, internals) stays in ``detail``,
for logs only. The gateway answers it with 503 ``service_unavailable``.
"""

from __future__ import annotations

from ..errors import StackError

__all__ = ["ServiceUnavailable"]


class ServiceUnavailable(StackError):
    """``service`` is unreachable or was lost; ``reason`` is shown, ``detail`` logged."""

    def __init__(self, service: str, reason: str, *, detail: str = "") -> None:
        super().__init__(f"{service} {reason}")
        self.service = service
        self.reason = reason
        self.detail = detail
