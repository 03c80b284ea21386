"""Process settings for tokenmill's long-running services.

CPython's cyclic garbage collector runs a young collection every 700 net allocations
and promotes what survives. A service with thousands of requests in flight keeps
promoting objects (tasks, futures, pydantic models) that die soon after, so it
collected many times a second and its full collections walked the whole start-up heap
(Celery, kombu, pydantic schemas; torch and vLLM in a vLLM worker). Measured on the
worker host with the zero-cost engine: the collector took ~40 % of its CPU.

:func:`tune_gc` freezes the start-up heap (never garbage) out of the collector's
sight and collects the young generation every 50,000 allocations. Reference counting
still frees almost everything at once; only reference cycles wait a little longer.
Users' own processes (the client library) are left alone.
"""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]

#: young-generation threshold, and how many collections of each generation before
#: the next older one is collected
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Call once a service has started (imports done, engine loaded)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
