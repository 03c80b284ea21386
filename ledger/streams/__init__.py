"""tokenmill.ledger.streams: stream processors from token events to the ledger.

Usage (per tenant × model × minute), billing (one charge per finished request, priced
with the price-card version in force) and SLA figures (TTFT, TPOT, end-to-end, queue
wait; violations published) are written to the ledger in one transaction per batch,
keyed by request id, before the batch's offsets may be committed: exact under
at-least-once delivery, crashes and rebalances; on SIGTERM they drain to zero lag
before stopping. See ``docs/streams.md``.
"""

from .app import EXIT_BATCH_FAILED, EXIT_DRAIN_TIMEOUT, StreamProcessor
from .config import DEFAULT_METRICS_PORT, StreamsConfig
from .decode import Rejected, parse
from .measure import TARGETS, Measurement, measure
from .metrics import StreamMetrics, serve
from .processor import BatchProcessor, BatchReport, Publisher, Record
from .sink import BatchOutcome, Card, LedgerSink, LedgerUnavailable, Recorded
from .violations import SlaViolation, violation_of
from .worker import run

__all__ = [
    "DEFAULT_METRICS_PORT",
    "EXIT_BATCH_FAILED",
    "EXIT_DRAIN_TIMEOUT",
    "TARGETS",
    "BatchOutcome",
    "BatchProcessor",
    "BatchReport",
    "Card",
    "LedgerSink",
    "LedgerUnavailable",
    "Measurement",
    "Publisher",
    "Record",
    "Recorded",
    "Rejected",
    "SlaViolation",
    "StreamMetrics",
    "StreamProcessor",
    "StreamsConfig",
    "measure",
    "parse",
    "run",
    "serve",
    "violation_of",
]
