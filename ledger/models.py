"""The ledger's tables, as typed SQLAlchemy 2 mapped classes.

Every idempotent write is backed by a unique key here, so a replayed message can
never add a second row: ``usage_records.request_id``, ``ledger_entries (request_id,
kind)``, ``sla_records.request_id``, ``webhook_deliveries.webhook_id``,
``webhook_attempts (delivery_id, attempt)``, ``price_card_versions (model,
effective_from)``, ``files.id`` (a batch's output files have ids derived from the
batch's). Tenant names are not foreign keys: history must outlive a tenant's
removal from the config, and stream processors must be able to record usage before
the tenant mirror is synced.

Enumerations are stored as short strings with a CHECK constraint (not native
PostgreSQL enum types, which are awkward to migrate); request state is the
:class:`~tokenmill.wire.RequestState` integer. Money columns are
:class:`~.types.ExactDecimal`; times are :class:`~.types.UtcDateTime`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from tokenmill.wire import BatchStatus, Endpoint, Priority, RequestState

from .types import ExactDecimal, StateType, UtcDateTime, utcnow


class EntryKind(StrEnum):
    """Kinds of ledger entries. Charges and partials are >= 0, refunds <= 0,
    adjustments either."""

    #: a finished request's tokens
    charge = "charge"
    refund = "refund"
    adjustment = "adjustment"
    #: the work done for a request cancelled, expired or failed after the engine
    #: started it (its prompt and the tokens generated so far)
    partial = "partial"


class FilePurpose(StrEnum):
    """What a file is for (OpenAI's purposes that tokenmill has)."""

    #: uploaded by a tenant as a batch's input
    batch = "batch"
    #: a batch's output or error file, written by the batch runner
    batch_output = "batch_output"


class FileStatus(StrEnum):
    """OpenAI's (deprecated, still required) file status."""

    #: uploaded by a tenant (tokenmill checks a batch file when a batch is made from it)
    uploaded = "uploaded"
    #: written by tokenmill
    processed = "processed"


class DeliveryStatus(StrEnum):
    """Webhook delivery states; ``delivered`` and ``dead`` are final."""

    pending = "pending"
    delivered = "delivered"
    dead = "dead"


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: money: exact to 10 decimal places (see :mod:`.money`)
MONEY = ExactDecimal(20, 10)
#: autoincrementing 64-bit id (SQLite autoincrements only an INTEGER primary key)
BIG_ID = BigInteger().with_variant(Integer(), "sqlite")
JSON_DOC = JSON().with_variant(JSONB(), "postgresql")
TENANT = String(128)
MODEL = String(256)
REQUEST_ID = String(512)
FILE_ID = String(64)


def str_enum(enum: type[StrEnum], name: str) -> Enum:
    """A VARCHAR + CHECK column type storing the enum's values."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), Decimal: MONEY}  # noqa: RUF012  (SQLAlchemy reads it)


class TenantRow(Base):
    """A mirror of the configured tenants, for reports and joins."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(TENANT, primary_key=True)
    tier: Mapped[str] = mapped_column(String(64))
    weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RequestRow(Base):
    """One accepted request and where it is in its lifecycle."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        CheckConstraint(f"state BETWEEN {min(RequestState)} AND {max(RequestState)}", name="state"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index(None, "tenant", "submitted_at"),
        Index(None, "state"),
    )

    id: Mapped[str] = mapped_column(REQUEST_ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    model: Mapped[str] = mapped_column(MODEL)
    priority: Mapped[Priority] = mapped_column(str_enum(Priority, "priority"))
    state: Mapped[RequestState] = mapped_column(StateType(), default=RequestState.QUEUED)
    batch_id: Mapped[str | None] = mapped_column(String(128))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    submitted_at: Mapped[datetime]
    dispatched_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: deliveries to a worker so far (1 after the first dispatch)
    attempts: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class BatchRow(Base):
    """An OpenAI-style batch (the wire :class:`~tokenmill.wire.Batch`, flattened)."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(
            "total_requests >= 0 AND completed_requests >= 0 AND failed_requests >= 0",
            name="request_counts",
        ),
        Index(None, "tenant", "created_at"),
        # the output cleanup's one query: files due to expire and not yet removed
        Index(None, "output_expired_at", "output_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    status: Mapped[BatchStatus] = mapped_column(str_enum(BatchStatus, "status"))
    endpoint: Mapped[Endpoint] = mapped_column(str_enum(Endpoint, "endpoint"))
    completion_window: Mapped[str] = mapped_column(String(16))
    input_file: Mapped[str] = mapped_column(Text)
    output_file: Mapped[str | None] = mapped_column(Text)
    error_file: Mapped[str | None] = mapped_column(Text)
    total_requests: Mapped[int] = mapped_column(default=0)
    completed_requests: Mapped[int] = mapped_column(default=0)
    failed_requests: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # "metadata" is reserved on declarative classes; the column keeps the OpenAI name.
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON_DOC)
    #: the file (:class:`FileRow`) the batch was made from
    input_file_id: Mapped[str | None] = mapped_column(FILE_ID)
    #: OpenAI's ``{"anchor", "seconds"}`` for the batch's output files, as given
    output_expires_after: Mapped[dict[str, Any] | None] = mapped_column(JSON_DOC)
    #: when its output and error files expire: their creation (the batch's end) plus
    #: ``output_expires_after.seconds``; None without an expiry or before the end
    output_expires_at: Mapped[datetime | None]
    #: when the batch runner's cleanup removed those files
    output_expired_at: Mapped[datetime | None]


class FileRow(Base):
    """A tenant's file (OpenAI's ``file`` object): an upload, or a batch's output or
    error file; its bytes live at ``path``."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("bytes >= 0", name="bytes"),
        Index(None, "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(FILE_ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    purpose: Mapped[FilePurpose] = mapped_column(str_enum(FilePurpose, "purpose"))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[FileStatus] = mapped_column(str_enum(FileStatus, "status"))
    #: when the file expires (a batch's output or error file with
    #: ``output_expires_after``); gone from the Files API from then on
    expires_at: Mapped[datetime | None]


class UsageRecord(Base):
    """The metered usage of one finished request (at most one row per request).

    Only its primary key is indexed: every query of usage by tenant or time reads the
    roll-up (:class:`UsageMinute`), and an index entry here costs every finished
    event's insert (migration 0002 dropped ``(tenant, minute)``)."""

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint("prompt_tokens >= 0 AND completion_tokens >= 0", name="tokens"),
    )

    request_id: Mapped[str] = mapped_column(REQUEST_ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    model: Mapped[str] = mapped_column(MODEL)
    priority: Mapped[Priority] = mapped_column(str_enum(Priority, "priority"))
    #: the request's finish time, truncated to the minute (UTC)
    minute: Mapped[datetime]
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageMinute(Base):
    """Per-minute usage roll-up, updated only with a newly inserted usage record."""

    __tablename__ = "usage_minutes"
    __table_args__ = (Index(None, "tenant", "minute"),)

    tenant: Mapped[str] = mapped_column(TENANT, primary_key=True)
    model: Mapped[str] = mapped_column(MODEL, primary_key=True)
    minute: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)


class PriceCardVersion(Base):
    """A price card as it was in force from ``effective_from``; never edited."""

    __tablename__ = "price_card_versions"
    __table_args__ = (
        UniqueConstraint("model", "effective_from"),
        # Only sign checks: on SQLite these columns hold scaled integers.
        CheckConstraint(
            "input_per_million >= 0 AND output_per_million >= 0 AND batch_discount >= 0",
            name="prices",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(MODEL)
    effective_from: Mapped[datetime]
    currency: Mapped[str] = mapped_column(String(3))
    input_per_million: Mapped[Decimal]
    output_per_million: Mapped[Decimal]
    #: fraction taken off batch-priority requests
    batch_discount: Mapped[Decimal]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """An append-only money movement for one request (database triggers refuse
    UPDATE and DELETE). ``amount`` is signed: the sum of entries is the spend."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("request_id", "kind"),
        CheckConstraint(
            "(kind IN ('charge', 'partial') AND amount >= 0)"
            " OR (kind = 'refund' AND amount <= 0) OR kind = 'adjustment'",
            name="amount_sign",
        ),
        CheckConstraint(
            "kind NOT IN ('charge', 'partial') OR price_card_version_id IS NOT NULL",
            name="charge_priced",
        ),
        CheckConstraint("prompt_tokens >= 0 AND completion_tokens >= 0", name="tokens"),
        Index(None, "tenant", "created_at"),
    )

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(REQUEST_ID)
    kind: Mapped[EntryKind] = mapped_column(str_enum(EntryKind, "kind"))
    tenant: Mapped[str] = mapped_column(TENANT)
    model: Mapped[str] = mapped_column(MODEL)
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    price_card_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("price_card_versions.id", ondelete="RESTRICT")
    )
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    #: when the billed event happened (a request's finish), which decides its period
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    price_card_version: Mapped[PriceCardVersion | None] = relationship(lazy="raise")


class SlaRecord(Base):
    """SLA measurements of one finished request."""

    __tablename__ = "sla_records"
    __table_args__ = (Index(None, "tenant", "finished_at"),)

    request_id: Mapped[str] = mapped_column(REQUEST_ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    tier: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(MODEL)
    sla_class: Mapped[str] = mapped_column(String(64))
    queue_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    tpot_ms: Mapped[float | None] = mapped_column(Float)
    e2e_ms: Mapped[float | None] = mapped_column(Float)
    met: Mapped[bool] = mapped_column(Boolean)
    finished_at: Mapped[datetime]


class WebhookDelivery(Base):
    """One webhook message (Standard Webhooks ``webhook-id``) and its delivery state."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "tenant", "created_at"),
    )

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(128), unique=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON_DOC)
    status: Mapped[DeliveryStatus] = mapped_column(
        str_enum(DeliveryStatus, "status"), default=DeliveryStatus.pending
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """One HTTP attempt of a webhook delivery."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        BIG_ID, ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempt: Mapped[int]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime]
