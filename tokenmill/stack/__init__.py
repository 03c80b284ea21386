"""The embedded local stack: broker, Redis and tokenmill services as child processes.

Every component finds the services with :func:`endpoints`; ``tokenmill up`` starts
them (:func:`tokenmill.stack.manager.up`), and later components add their own
processes as :class:`ServiceSpec` (see :mod:`tokenmill.stack.spec`).
"""

from .endpoints import Endpoints, endpoints
from .spec import Launch, ServiceSpec, StopStage, register_factory

__all__ = ["Endpoints", "Launch", "ServiceSpec", "StopStage", "endpoints", "register_factory"]
