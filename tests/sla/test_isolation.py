"""SLA-aware serving end to end on a local stack (the SLA-aware timed sim model of
bench/isolation.py): interactive requests untouched by a batch flood, the flood
untouched by them, and batches planned against their completion windows."""

from __future__ import annotations

import asyncio
import time

from harness.isolation_stack import (
    IsolationStack,
    WindowedBatch,
    flood_with_trickle,
    pct,
    submit_batches,
    tokens_per_s,
    wait_ended,
    within_window,
)
from webhook_receiver import Receiver

#: below this, twice the queue wait alone measures a 2-core machine's scheduling jitter
#: (Kafka hop, Celery publish), not isolation
QUEUE_WAIT_FLOOR_MS = 20.0


def test_a_batch_flood_leaves_interactive_requests_and_itself_untouched(
    stack: IsolationStack,
) -> None:
    async def run() -> tuple[list, list, list, list]:  # type: ignore[type-arg]
        await stack.trickle("iso", every_s=0.05, max_tokens=4, until=None, at_most=4)  # warm-up
        alone = await stack.trickle("iso", every_s=0.2, max_tokens=4, until=None, at_most=12)
        flood_alone = await stack.flood("iso", 64, 48)
        flood, trickle = await flood_with_trickle(
            stack, "iso", n=64, max_tokens=48, every_s=0.2, trickle_tokens=4
        )
        return alone, flood_alone, flood, trickle

    alone, flood_alone, flood, trickle = asyncio.run(run())
    assert len(trickle) >= 8, "the trickle ran through the flood"
    wait_alone = pct([f.queue_ms or 0.0 for f in stack.with_sla(alone)], 0.99)
    wait_flood = pct([f.queue_ms or 0.0 for f in stack.with_sla(trickle)], 0.99)
    assert wait_flood <= 2 * max(wait_alone, QUEUE_WAIT_FLOOR_MS), (wait_alone, wait_flood)
    # TTFT too: an interactive request never waited for a 48-token batch sequence (~0.5 s)
    ttft = [f.ttft_ms or 0.0 for f in trickle]
    assert pct(ttft, 0.99) < 250, sorted(ttft)
    ratio = tokens_per_s(flood) / tokens_per_s(flood_alone)
    assert ratio >= 0.9, ratio


def test_batches_are_planned_against_their_windows(
    stack: IsolationStack, receiver: Receiver
) -> None:
    batches = [
        WindowedBatch("flood", lines=160, window="60s", max_tokens=32),
        # alone ~1.6 s; at its tenant's fair share (1 of 6 weights) ~10 s: misses 6 s
        WindowedBatch("late", lines=40, window="6s", max_tokens=32, after_s=1.5),
        # no order finishes 200 lines in 4 s behind the others
        WindowedBatch("doomed", lines=200, window="4s", max_tokens=32, after_s=2.0),
    ]
    submit_batches(stack, "iso", batches, webhook=receiver.url + "/hooks")
    ended = wait_ended(stack, batches, timeout_s=120)
    flood, late, doomed = (ended[b.batch_id] for b in batches)
    assert within_window(flood) and within_window(late), (flood, late)
    assert doomed["status"] == "expired"
    # flagged while there was time to act, and told to its webhook once
    assert doomed["seen_at_risk_at"] is not None
    assert doomed["seen_at_risk_at"] < doomed["expires_at"]
    assert doomed["sla_at_risk_now"] == 1  # the tenant's SLA report said so too
    assert late["sla_at_risk_now"] is None  # never at risk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        at_risk = [
            p.json() for p in receiver.received("/hooks") if p.json()["type"] == "batch.at_risk"
        ]
        if at_risk:
            break
        time.sleep(0.2)
    assert [p["data"]["id"] for p in at_risk] == [doomed["id"]]
    assert at_risk[0]["data"]["forecast"]["at_risk"] is True
    assert at_risk[0]["data"]["forecast"]["estimated_completion_at"] > doomed["expires_at"]
