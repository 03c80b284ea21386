"""The ledger's mirror of the configured tenants."""

from __future__ import annotations

from sqlalchemy.orm import Session
from tokenmill.config import Settings

from .errors import translated
from .models import TenantRow
from .types import utcnow
from .upsert import dialect_insert


@translated
def sync_tenants(session: Session, settings: Settings) -> None:
    """Insert the configured tenants, updating the tier and weight of known ones.

    Tenants removed from the config stay: their history still refers to them.

    Raises:
        LedgerError: the database refused the write.
    """
    for name, tenant in settings.tenants.items():
        stmt = dialect_insert(session, TenantRow).values(
            name=name, tier=tenant.tier, weight=settings.tenant_weight(name), created_at=utcnow()
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["name"],
                set_={"tier": stmt.excluded.tier, "weight": stmt.excluded.weight},
            )
        )
