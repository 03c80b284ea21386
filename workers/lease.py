"""Who runs a request: per-request leases, attempt numbers, and keeping a running
message invisible to other workers.

Why two mechanisms (the full argument is in ``docs/workers.md``):

* **Broker visibility.** Celery's Redis transport keeps an unacked message in the
  ``unacked`` hash, scored by delivery time in ``unacked_index``; any worker's sweep
  puts messages older than ``visibility_timeout`` back on the queue. We use a *short*
  visibility timeout (so a SIGKILLed worker's messages come back in seconds) and the
  running worker *renews* its messages' scores every second
  (:func:`renew_visibility`), so a long request is never handed out again while its
  worker lives.
* **Request lease.** ``tokenmill:lease:<request_id>`` (``SET NX PX``) names the worker
  running the request; it renews it every second. If a message is delivered while a
  live worker holds the lease (a renewal missed), the second worker does not run
  it: it waits for the outcome, or for the lease to lapse (holder dead) and then
  runs it. So one request never runs on two engines at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as aredis

from . import keys

__all__ = ["Admission", "Leases", "renew_visibility"]

# Per request, 6 KEYS: lease, result, final-event, reported, cancel, attempts.
# ARGV: holder, lease ttl (ms), attempts ttl (s).
_ADMIT = """
local out = {}
for i = 1, #KEYS, 6 do
  local lease = KEYS[i]
  local got = redis.call('SET', lease, ARGV[1], 'NX', 'PX', ARGV[2])
  if not got and redis.call('GET', lease) == ARGV[1] then got = true end
  if not got then
    out[#out + 1] = {0, false, false, 0, 0, 0}
  else
    local result = redis.call('GET', KEYS[i + 1])
    local final, reported = false, 0
    local cancel = redis.call('EXISTS', KEYS[i + 4])
    local attempt = 0
    if result then  -- only a settled request's event and its delivery matter
      final = redis.call('GET', KEYS[i + 2])
      reported = redis.call('EXISTS', KEYS[i + 3])
    else
      attempt = redis.call('INCR', KEYS[i + 5])
      redis.call('EXPIRE', KEYS[i + 5], ARGV[3])
    end
    out[#out + 1] = {1, result, final, reported, cancel, attempt}
  end
end
return out
"""

# KEYS: reported, lease, reported, lease, ...; ARGV: holder, reported ttl.
_SETTLE = """
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i], '1', 'EX', ARGV[2])
  if redis.call('GET', KEYS[i + 1]) == ARGV[1] then redis.call('DEL', KEYS[i + 1]) end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """What one round trip learned about a request before running it."""

    #: we hold its lease (False: another live worker does)
    acquired: bool
    #: stored Result / terminal TokenEvent JSON, if it already has an outcome
    result: bytes | None = None
    final_event: bytes | None = None
    reported: bool = False
    cancel_requested: bool = False
    #: this run's number (counted only when acquired and not yet settled)
    attempt: int = 0

_RENEW = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2]); n = n + 1
  end
end
return n
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """Leases held by one worker (``holder``), over an asyncio Redis client."""

    def __init__(self, client: aredis.Redis, holder: str, *, ttl_s: float) -> None:
        self.client = client
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    async def admit(self, request_ids: Sequence[str], *, attempts_ttl_s: int = 7 * 24 * 3600) -> list[Admission]:
        """For each request, in one round trip: take its lease and, if we got it, read
        its outcome, cancel flag and count the attempt (one Lua script)."""
        if not request_ids:
            return []
        ks: list[str] = []
        for rid in request_ids:
            ks += [keys.lease(rid), keys.result(rid), keys.final_event(rid), keys.reported(rid),
                   keys.cancel(rid), keys.attempts(rid)]
        rows = await self._admit(keys=ks, args=[self.holder, self.ttl_ms, attempts_ttl_s])
        return [
            Admission(
                acquired=bool(row[0]), result=row[1] or None, final_event=row[2] or None,
                reported=bool(row[3]), cancel_requested=bool(row[4]), attempt=int(row[5]),
            )
            for row in rows
        ]

    async def settle_many(
        self, request_ids: Sequence[str], *, reported_ttl_s: int = 7 * 24 * 3600
    ) -> list[None]:
        """Mark each outcome's terminal event as delivered and release our lease, for
        all of ``request_ids`` in one script call."""
        if request_ids:
            ks: list[str] = []
            for rid in request_ids:
                ks += [keys.reported(rid), keys.lease(rid)]
            await self._settle(keys=ks, args=[self.holder, reported_ttl_s])
        return [None] * len(request_ids)

    async def renew(self, pipe: aredis.client.Pipeline, request_ids: Iterable[str]) -> None:
        """Queue, on ``pipe``, the extension of our leases on ``request_ids`` (its reply:
        how many were still ours)."""
        ks = [keys.lease(r) for r in request_ids]
        if ks:
            await self._renew(keys=ks, args=[self.holder, self.ttl_ms], client=pipe)

    async def release(self, request_id: str) -> None:
        await self._release(keys=[keys.lease(request_id)], args=[self.holder])


def renew_visibility(
    pipe: aredis.client.Pipeline, delivery_tags: Iterable[str], *, index_key: str, now: float
) -> None:
    """Queue, on ``pipe``: mark our unacked messages as delivered ``now`` (``ZADD XX``:
    never re-adds an acked one), so the transport's sweep does not hand them to another
    worker."""
    mapping = {tag: now for tag in delivery_tags}
    if mapping:
        pipe.zadd(index_key, mapping, xx=True)
