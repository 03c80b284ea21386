"""``tokenmill sla --live``: the fair-share and SLA figures of a sliding window
(:mod:`.fairness`, the same figures the stream processors export as gauges), read from
the ledger and redrawn as a Rich table every few seconds until ``--duration`` ends or
Ctrl-C."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.live import Live
from rich.table import Table
from tokenmill.config import Settings

from .fairness import Fairness, fairness_of


def fairness_table(figures: Fairness, *, at: datetime) -> Table:
    """One window's figures: a row per tenant × class; Jain's index per class below."""
    minutes = figures.window_s / 60
    table = Table(title=f"Fair share and SLA, last {minutes:g} min (at {at:%H:%M:%S} UTC)")
    table.add_column("tenant")
    table.add_column("class")
    for col in ("requests", "received / entitled", "largest gap s", "queue p50 / p99 s",
                "TTFT p99 s", "TPOT p99 s", "e2e p99 s", "attainment", "goodput req/s"):  # fmt: skip
        table.add_column(col, justify="right")
    for t in figures.tenants:
        table.add_row(
            t.tenant, t.priority, f"{t.requests:,}",
            f"{t.received_share:.1%} / {t.entitled_share:.1%}", f"{t.largest_gap_s:.2f}",
            f"{_s(t.queue_p50_s)} / {_s(t.queue_p99_s)}", _s(t.ttft_p99_s), _s(t.tpot_p99_s),
            _s(t.e2e_p99_s), f"{t.attainment:.1%}", f"{t.goodput_rps:.3f}",
        )  # fmt: skip
    if not figures.tenants:
        table.caption = "no finished requests in the window"
    else:
        table.caption = "Jain's index (1: every tenant got its entitled share): " + ", ".join(
            f"{prio} {jain:.3f}" for prio, jain in figures.jain.items()
        )
    return table


def run_live(
    read: Callable[[datetime], Fairness],
    *,
    console: Console,
    interval_s: float,
    duration_s: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Redraw ``read(now)`` every ``interval_s`` until ``duration_s`` has passed (None:
    until Ctrl-C, which ends it cleanly too). Returns how many times it was drawn."""
    deadline = None if duration_s is None else clock() + duration_s
    drawn = 0
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                now = datetime.now(UTC)
                live.update(fairness_table(read(now), at=now), refresh=True)
                drawn += 1
                left = None if deadline is None else deadline - clock()
                if left is not None and left <= 0:
                    break
                time.sleep(interval_s if left is None else min(interval_s, left))
    except KeyboardInterrupt:
        pass
    return drawn


@contextmanager
def ledger_reader(settings: Settings, window_s: float) -> Iterator[Callable[[datetime], Fairness]]:
    """A reader of the window ending at a given instant, from the ledger ``settings``
    name (one engine, migrated once; a short transaction per read)."""
    from .db import make_engine, migrate, session_factory, transaction
    from .sla import served_requests

    engine = make_engine(settings.ledger_url)
    try:
        migrate(engine)
        sessions = session_factory(engine)

        def read(now: datetime) -> Fairness:
            with transaction(sessions) as session:
                rows = served_requests(session, now - timedelta(seconds=window_s), now)
            return fairness_of(rows, settings, window_s)

        yield read
    finally:
        engine.dispose()


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"
