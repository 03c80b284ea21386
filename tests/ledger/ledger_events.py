"""Token events for the ledger tests, written through the real write path (LedgerSink)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tokenmill.config import PriceCard

from tokenmill.wire import EventKind, Priority, TokenEvent

JAN = datetime(2026, 1, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)
#: sim changes price on March 1st; every model the example config names has a card
CARDS = [
    PriceCard(model="sim", effective_from=JAN, input_per_million=Decimal("0.10"),
              output_per_million=Decimal("0.40"), batch_discount=Decimal("0.5")),
    PriceCard(model="sim", effective_from=MAR, input_per_million=Decimal("0.12"),
              output_per_million=Decimal("0.48"), batch_discount=Decimal("0.5")),
    PriceCard(model="smollm2", effective_from=JAN, input_per_million=Decimal("0.20"),
              output_per_million=Decimal("0.80")),
    # an embedding model's card: input tokens only
    PriceCard(model="minilm", effective_from=JAN, input_per_million=Decimal("0.02")),
]  # fmt: skip
MILLION = Decimal(1_000_000)


def event(
    request_id: str,
    at: datetime | float,
    *,
    kind: EventKind = EventKind.finished,
    tenant: str = "alpha",
    model: str = "sim",
    priority: Priority = Priority.standard,
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
    ttft_s: float = 0.1,
    tpot_s: float = 0.01,
) -> TokenEvent:
    """A terminal event ending at ``at``, timed backwards from it."""
    end = at.timestamp() if isinstance(at, datetime) else at
    start = end - (ttft_s + tpot_s * max(completion_tokens - 1, 0))
    return TokenEvent(
        kind=kind, request_id=request_id, tenant=tenant, model=model, priority=priority,
        worker="test", seq=completion_tokens + 1, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, ts=end, submitted_at=start,
        dispatched_at=start + 0.001, first_token_at=start + ttft_s if completion_tokens else None,
        finished_at=end,
    )  # fmt: skip


def expected_cost(event: TokenEvent, card: PriceCard) -> Decimal:
    """The price of ``event`` under ``card``, computed here independently of
    tokenmill.pricing."""
    amount = (card.input_per_million * event.prompt_tokens
              + card.output_per_million * event.completion_tokens) / MILLION  # fmt: skip
    if event.priority is Priority.batch:
        amount *= 1 - card.batch_discount
    return amount
