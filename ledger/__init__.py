"""tokenmill.ledger: what must survive a restart, exact to the token and the cent.

SQLAlchemy 2 models with Alembic migrations, on SQLite (embedded) or PostgreSQL.
Every write is idempotent (keyed by request, message or version id), so at-least-once
delivery never double-counts. Functions take the caller's session and never commit;
see :mod:`.db` for transactions and :mod:`.money` for the rounding rule.
"""

from .batches import active_batches, get_batch, list_batches, lock_batch, upsert_batch
from .billing import (
    Invoice,
    InvoiceLine,
    Period,
    invoice,
    price_card_version_for,
    record_charge,
    sync_price_cards,
    tenant_spend,
)
from .db import (
    downgrade,
    make_engine,
    migrate,
    normalize_url,
    run_transaction,
    schema_diff,
    session_factory,
    shared_factory,
    transaction,
)
from .errors import IllegalTransition, LedgerConflict
from .models import (
    Base,
    BatchRow,
    DeliveryStatus,
    EntryKind,
    LedgerEntry,
    PriceCardVersion,
    RequestRow,
    SlaRecord,
    TenantRow,
    UsageMinute,
    UsageRecord,
    WebhookAttempt,
    WebhookDelivery,
)
from .money import exact, to_minor_unit
from .requests import (
    advance_request,
    get_request,
    unfinished_batch_requests,
    upsert_request,
    upsert_requests,
)
from .sla import record_sla
from .state_machine import TRANSITIONS, can_transition, check_transition
from .tenants import sync_tenants
from .usage import (
    UsageItem,
    UsageTotals,
    minute_of,
    record_usage,
    record_usage_many,
    usage_minutes,
    usage_totals,
)
from .webhooks import (
    enqueue_webhook,
    get_webhook,
    lease_due_webhooks,
    list_webhooks,
    record_webhook_attempt,
)

__all__ = [
    "TRANSITIONS",
    "Base",
    "BatchRow",
    "DeliveryStatus",
    "EntryKind",
    "IllegalTransition",
    "Invoice",
    "InvoiceLine",
    "LedgerConflict",
    "LedgerEntry",
    "Period",
    "PriceCardVersion",
    "RequestRow",
    "SlaRecord",
    "TenantRow",
    "UsageItem",
    "UsageMinute",
    "UsageRecord",
    "UsageTotals",
    "WebhookAttempt",
    "WebhookDelivery",
    "active_batches",
    "advance_request",
    "can_transition",
    "check_transition",
    "downgrade",
    "enqueue_webhook",
    "exact",
    "get_batch",
    "get_request",
    "get_webhook",
    "invoice",
    "lease_due_webhooks",
    "list_batches",
    "list_webhooks",
    "lock_batch",
    "make_engine",
    "migrate",
    "minute_of",
    "normalize_url",
    "price_card_version_for",
    "record_charge",
    "record_sla",
    "record_usage",
    "record_usage_many",
    "record_webhook_attempt",
    "run_transaction",
    "schema_diff",
    "session_factory",
    "shared_factory",
    "sync_price_cards",
    "sync_tenants",
    "tenant_spend",
    "to_minor_unit",
    "transaction",
    "unfinished_batch_requests",
    "upsert_batch",
    "upsert_request",
    "upsert_requests",
    "usage_minutes",
    "usage_totals",
]
