"""Per-batch leases in Redis: any number of batch runners share the batches, and no
batch is stepped by two of them at once.

A runner *holds* a batch while Redis key ``tokenmill:batch-lease:{<id>}`` says
``<owner> <token>``. The key lives ``ttl_s`` and the holder renews it every poll; a
runner steps only the batches it holds, so a dead runner's batches are free again
within ``ttl_s`` and another runner resumes them from the batch's files and the ledger.

Every grant draws a new *fencing token* (``INCR`` per batch). A holder that lost its
lease without noticing (paused past the TTL, a stalled event loop) still believes it
holds the batch; so the runner checks the lease (:meth:`BatchLeases.check`) with the
batch locked in the ledger (``lock_batch``: the row on PostgreSQL, the database's write
lock on SQLite) right before every write, and a new holder takes the same lock before
it reads the batch's files. Either the old holder wrote before the new one read, or it
writes nothing.

Which free batches a runner takes (:func:`choose`): its fair share of the active
batches among the live runners (``tokenmill status`` presence), at most
:data:`MAX_NEW_PER_POLL` a poll, in an order of its own (rendezvous hashing), so copies
spread batches instead of racing for the same one. A batch left free for a whole TTL
is taken beyond the share: a runner that died must not wait for presence to age out.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aredis

from ..errors import TokenmillError
from ..logs import get_logger
from ..presence import instance_id
from ..workers import keys

__all__ = [
    "MAX_NEW_PER_POLL",
    "BatchLeases",
    "Lease",
    "LeaseLost",
    "choose",
    "lease_key",
]

log = get_logger(__name__)

#: new batches a runner takes per poll: copies started together share the batches
MAX_NEW_PER_POLL = 1
#: how long a batch's token counter outlives its last grant
_COUNTER_TTL_MS = 7 * 24 * 3600 * 1000

# Take the lease if nobody holds it; each grant draws the next fencing token.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
"""
# Extend (or drop) the lease only while it is still this holder's grant.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(TokenmillError):
    """This runner no longer holds the batch's lease: it must not write for it."""


def lease_key(batch_id: str) -> str:
    # The hash tag keeps the lease and its token counter in one Redis Cluster slot.
    return f"{keys.PREFIX}batch-lease:{{{batch_id}}}"


def _counter_key(batch_id: str) -> str:
    return f"{keys.PREFIX}batch-lease-token:{{{batch_id}}}"


@dataclass(frozen=True, slots=True)
class Lease:
    batch_id: str
    token: int  #: the fencing token: grants of one batch get increasing tokens
    value: bytes  #: what the lease key holds while this grant lasts


def choose(
    free: Sequence[str],
    *,
    active: int,
    held: int,
    copies: int,
    owner: str,
    free_since: Mapping[str, float],
    now: float,
    ttl_s: float,
) -> list[str]:
    """Which of the ``free`` batches (no lease) to try to take this poll.

    Parameters:
        active: how many batches are active in all.
        held: how many this runner holds.
        copies: live runners (this one included).
        free_since: when this runner first saw each batch free (monotonic).
    """
    if not free:
        return []
    share = math.ceil(active / max(1, copies))
    orphans = [b for b in free if now - free_since.get(b, now) >= ttl_s]
    room = max(0, share - held)
    # Order by a hash of (owner, batch): each copy prefers different batches.
    ranked = sorted(free, key=lambda b: hashlib.blake2b(f"{owner}/{b}".encode(), digest_size=8).digest())
    picked = [b for b in ranked if b in orphans] + [b for b in ranked if b not in orphans]
    return picked[: min(MAX_NEW_PER_POLL, max(room, 1 if orphans else 0))]


class BatchLeases:
    """This runner's leases. Call :meth:`renew` every poll (well within ``ttl_s``)."""

    def __init__(self, client: aredis.Redis, *, ttl_s: float, owner: str | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"batch lease ttl_s must be positive, not {ttl_s}")
        self.client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.ttl_s = ttl_s
        #: unique per process life: a restarted runner never mistakes an old grant for its own
        self.owner = owner or f"{instance_id()}/{uuid.uuid4().hex[:8]}"
        self.held: dict[str, Lease] = {}
        self._free_since: dict[str, float] = {}
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def token(self, batch_id: str) -> int:
        return self.held[batch_id].token

    async def take(self, active: Sequence[str], copies: int) -> list[Lease]:
        """Try to take this poll's share of the active batches nobody holds."""
        others = [b for b in active if b not in self.held]
        for gone in set(self._free_since) - set(others):
            del self._free_since[gone]
        if not others:
            return []
        values = await self.client.mget([lease_key(b) for b in others])
        free = [b for b, v in zip(others, values) if v is None]
        now = time.monotonic()
        for b, v in zip(others, values):
            if v is None:
                self._free_since.setdefault(b, now)
            else:
                self._free_since.pop(b, None)
        taken = []
        for batch_id in choose(free, active=len(active), held=len(self.held), copies=copies, owner=self.owner,
                               free_since=self._free_since, now=now, ttl_s=self.ttl_s):
            lease = await self.acquire(batch_id)
            if lease is not None:
                taken.append(lease)
        return taken

    async def acquire(self, batch_id: str) -> Lease | None:
        """Take the batch's lease if nobody holds it; None if somebody does."""
        token = int(await self._acquire(keys=[lease_key(batch_id), _counter_key(batch_id)],
                                        args=[self.owner, self.ttl_ms, _COUNTER_TTL_MS]))
        if not token:
            return None
        lease = Lease(batch_id, token, f"{self.owner} {token}".encode())
        self.held[batch_id] = lease
        self._free_since.pop(batch_id, None)
        log.info("batch lease taken", batch_id=batch_id, token=token, owner=self.owner)
        return lease

    async def renew(self) -> list[str]:
        """Extend every lease held; returns (and forgets) the batches whose lease was lost."""
        if not self.held:
            return []
        pipe = self.client.pipeline(transaction=False)
        leases = list(self.held.values())
        for lease in leases:
            await self._renew(keys=[lease_key(lease.batch_id)], args=[lease.value, self.ttl_ms], client=pipe)
        kept = await pipe.execute()
        lost = [lease.batch_id for lease, ok in zip(leases, kept) if not ok]
        for batch_id in lost:
            log.warning("batch lease lost", batch_id=batch_id, token=self.held[batch_id].token, owner=self.owner)
            del self.held[batch_id]
        return lost

    async def check(self, batch_id: str) -> Lease:
        """The fence: the lease if Redis still says this grant holds the batch.

        Raises:
            LeaseLost: the lease expired or another runner holds it (forgotten here too).
        """
        lease = self.held.get(batch_id)
        if lease is not None and await self.client.get(lease_key(batch_id)) == lease.value:
            return lease
        self.held.pop(batch_id, None)
        raise LeaseLost(f"batch {batch_id}: lease lost by {self.owner}")

    async def release(self, batch_id: str) -> None:
        lease = self.held.pop(batch_id, None)
        if lease is not None:
            await self._release(keys=[lease_key(batch_id)], args=[lease.value])

    async def release_all(self) -> None:
        for batch_id in list(self.held):
            await self.release(batch_id)

    def forget(self, batch_ids: Collection[str]) -> None:
        for batch_id in batch_ids:
            self.held.pop(batch_id, None)
