"""The one error tree of tokenmill.

Every error a user can see derives from :class:`TokenmillError`; exceptions of the
libraries underneath (aiokafka, Celery, SQLAlchemy, vLLM, pydantic) are translated
where they enter, with ``raise ... from exc``::

    TokenmillError
    ├── ConfigError              bad settings file or environment (names file, key, reason)
    ├── SchemaError              a wire message that cannot be read
    │   └── UnsupportedSchemaVersion   newer major version than this build understands
    ├── ValidationError          a request or batch line the user sent is invalid
    ├── StackError               a local-stack service failed to start, stop or answer
    │   └── ServiceUnavailable   (tokenmill.stack.errors) Redis or Kafka lost under a request
    ├── LedgerError              the ledger database refused an operation
    ├── EngineError              an inference engine failed (recoverable per request)
    │   └── EngineDeadError      the engine is gone; the worker must restart it
    ├── SchedulerError           (tokenmill.scheduler.errors) bad scheduler input
    ├── NotFound                 an id (request, batch, tenant) that does not exist
    ├── AuthenticationError      the API key is missing or unknown (HTTP 401/403)
    └── RateLimited              too many requests (HTTP 429); says when to retry
        └── QuotaExceeded        the tenant's budget is spent (429 ``insufficient_quota``)
"""

from __future__ import annotations


class TokenmillError(Exception):
    """Base of every error tokenmill raises on purpose."""


class ConfigError(TokenmillError):
    """The settings file or environment is invalid."""


class SchemaError(TokenmillError):
    """A wire message is malformed or of an unknown kind."""


class UnsupportedSchemaVersion(SchemaError):
    """A wire message carries a newer major schema version than this build reads."""


class ValidationError(TokenmillError):
    """User input (a request, a batch line) is invalid; the message says where."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None):
        super().__init__(message)
        self.field = field
        self.line = line


class StackError(TokenmillError):
    """A service of the local stack failed to start, stop or answer."""


class LedgerError(TokenmillError):
    """The ledger database refused an operation."""


class EngineError(TokenmillError):
    """An inference engine failed a request; other requests may go on."""


class EngineDeadError(EngineError):
    """The engine itself is gone; every request in flight on it has failed."""


class NotFound(TokenmillError):
    """An id that does not exist (or belongs to another tenant)."""


class AuthenticationError(TokenmillError):
    """The gateway refused the API key: none given, unknown, or not allowed (401/403)."""


class RateLimited(TokenmillError):
    """The gateway refused the request for now (HTTP 429); ``retry_after`` is in seconds
    (None when the gateway gave none)."""

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class QuotaExceeded(RateLimited):
    """The tenant's budget is spent (HTTP 429 ``insufficient_quota``)."""
