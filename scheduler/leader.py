"""One active scheduler per pool set: a lease in Redis with a fencing token.

Any number of ``tokenmill scheduler`` processes may run; the one that holds the lease
(Redis key ``tokenmill:scheduler:lease:{<poolset>}``, value ``<token> <instance>``) is
ACTIVE, the others are STANDBY: they consume nothing and dispatch nothing, and try to
take the lease every :data:`POLL_EVERY_S`. Each grant draws the next *fencing token*
from a counter (``INCR``), so tokens only grow across takeovers.

Timing (why these numbers): the holder renews every :data:`RENEW_EVERY_S` and the lease
lives :data:`LEASE_TTL_S`, so four renewals in a row may fail (a slow Redis, a GC pause)
before it is lost; a SIGKILLed holder's lease is free at most 2.5 s after its death and
a standby takes it within one more poll, leaving ~2 s of the 5 s failover target for the
new leader's start (snapshot, in-flight hash, ledger, Kafka offsets).

Renewals run on a thread of their own with a plain (sync) Redis client, so a busy event
loop (a large slice, a burst of events on a loaded machine) cannot starve them. And a
grant that lapsed while *nobody else took it* (the counter still holds its token) is
taken back by the next renewal: no other leader can have acted, so a lone scheduler
stalled past its TTL keeps leading instead of exiting.

A leader that was paused past the TTL still believes it leads. It is *fenced*: every
write that acts — a slice's dispatch (marks + Celery publish), a snapshot or in-flight
write — runs in a Lua script that first checks that the lease still holds this grant,
and does nothing otherwise (:func:`fenced_script`). Between renewals the holder also
asks Redis before it acts once the last successful renewal is a TTL old
(:meth:`LeaderLease.ensure`). A leader that finds itself fenced exits (:data:`FENCED_EXIT_CODE`);
its supervisor starts it again, as a standby.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable

import redis
import redis.asyncio as aredis

from ..logs import get_logger
from ..presence import instance_id
from ..workers import keys
from .errors import SchedulerError

__all__ = [
    "ALL_POOLS",
    "FENCED_EXIT_CODE",
    "LEASE_TTL_S",
    "POLL_EVERY_S",
    "RENEW_EVERY_S",
    "Fenced",
    "LeaderLease",
    "fenced_script",
    "lease_key",
]

log = get_logger(__name__)

#: how long a grant lives without renewal
LEASE_TTL_S = 2.5
#: how often the holder renews (a fifth of the TTL: four misses in a row are survived)
RENEW_EVERY_S = 0.5
#: how often a standby tries to take a free lease
POLL_EVERY_S = 0.25
#: exit status of a scheduler that lost its lease while it led (EX_TEMPFAIL: start it
#: again and it comes back as a standby)
FENCED_EXIT_CODE = 75
#: the pool set of a scheduler that serves every configured pool
ALL_POOLS = "all"
#: how long the token counter outlives its last grant
_COUNTER_TTL_MS = 30 * 24 * 3600 * 1000

# KEYS: lease, counter; ARGV: instance, ttl ms, counter ttl ms. Returns the new token,
# or 0 when the lease is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'NX', 'PX', ARGV[2])
return token
"""
# KEYS: lease, counter; ARGV: this grant's value, ttl ms, its token. 1 if renewed, 2 if
# taken back (it had lapsed and no grant followed it), 0 if another grant exists.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not held and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
# KEYS: lease, counter; ARGV: this grant's value, its token. Drawing a token past this
# grant's means nothing can take it back afterwards (a renewal racing the release).
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('INCR', KEYS[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: the fence every acting script opens with: KEYS[1] the lease, ARGV[1] this grant's
#: value; a script refused by it returns -1 and has written nothing
_FENCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
"""


def fenced_script(body: str) -> str:
    """``body`` (a Lua script) run only while the lease holds this grant.

    The script gets the lease as ``KEYS[1]`` and the grant's value as ``ARGV[1]``; its
    own keys and arguments follow. It returns -1, having written nothing, when fenced.
    """
    return _FENCE + body


class Fenced(SchedulerError):
    """This scheduler no longer holds its lease: another one leads now; it must stop."""


def lease_key(poolset: str = ALL_POOLS) -> str:
    # The hash tag keeps the lease and its counter in one Redis Cluster slot.
    return f"{keys.PREFIX}scheduler:lease:{{{poolset}}}"


def _counter_key(poolset: str) -> str:
    return f"{keys.PREFIX}scheduler:lease-token:{{{poolset}}}"


class LeaderLease:
    """This process's claim on a pool set's scheduler lease.

    ``renew_client``, a sync client on the same Redis, renews from a thread (see the
    module's docstring); without it :meth:`keep` renews on the event loop.
    """

    def __init__(
        self,
        client: aredis.Redis,
        poolset: str = ALL_POOLS,
        *,
        ttl_s: float = LEASE_TTL_S,
        instance: str | None = None,
        renew_client: redis.Redis | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"scheduler lease ttl_s must be positive, not {ttl_s}")
        self.client = client
        self.renew_client = renew_client
        self.poolset = poolset
        self.key = lease_key(poolset)
        self.counter_key = _counter_key(poolset)
        self.ttl_s = ttl_s
        self.ttl_ms = max(1, int(ttl_s * 1000))
        #: unique per process life: a restarted process never mistakes an old grant for its own
        self.instance = instance or f"{instance_id()}/{uuid.uuid4().hex[:8]}"
        self.token: int | None = None
        #: what the lease key holds while this grant lasts
        self.value: str | None = None
        #: monotonic time before which the grant surely still holds (last renewal + TTL)
        self._valid_until = 0.0
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._renew_sync = renew_client.register_script(_RENEW) if renew_client else None

    @property
    def held(self) -> bool:
        return self.value is not None

    def valid(self) -> bool:
        """Held, and renewed less than a TTL ago (no Redis call): a process that was
        paused past that may have been replaced, so it must not act until it knows."""
        return self.value is not None and time.monotonic() < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        started = time.monotonic()
        token = int(
            await self._acquire(
                keys=[self.key, self.counter_key],
                args=[self.instance, self.ttl_ms, _COUNTER_TTL_MS],
            )
        )
        if not token:
            return False
        self.token, self.value = token, f"{token} {self.instance}"
        self._valid_until = started + self.ttl_s
        log.info("scheduler lease taken", poolset=self.poolset, fencing_token=token,
                 instance=self.instance)  # fmt: skip
        return True

    async def wait_until_held(self, stop: asyncio.Event, poll_s: float = POLL_EVERY_S) -> bool:
        """Poll until this process holds the lease (True) or ``stop`` is set (False).

        A Redis error is logged and retried: a standby outlives a Redis restart.
        """
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
            except (redis.RedisError, OSError) as exc:
                log.warning("scheduler lease not checked", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        return False

    async def renew(self) -> None:
        """Extend the grant (or take it back, see the module's docstring).

        Raises:
            Fenced: the grant is gone (another scheduler holds the lease).
        """
        value = self.value
        if value is None:
            raise Fenced(f"scheduler lease {self.key}: not held")
        started = time.monotonic()
        got = await self._renew(keys=[self.key, self.counter_key], args=[value, self.ttl_ms, self.token])
        self._renewed(int(got), started)

    def _renew_in_thread(self) -> None:
        value = self.value
        if value is None or self._renew_sync is None:
            raise Fenced(f"scheduler lease {self.key}: not held")
        started = time.monotonic()
        got = self._renew_sync(keys=[self.key, self.counter_key], args=[value, self.ttl_ms, self.token])
        self._renewed(int(got), started)

    def _renewed(self, reply: int, started: float) -> None:
        if not reply:
            raise self.lost("renewal refused")
        if reply == 2:
            log.warning("scheduler lease had lapsed; taken back (no other grant since)",
                        poolset=self.poolset, fencing_token=self.token)  # fmt: skip
        self._valid_until = started + self.ttl_s

    async def keep(self, stop: asyncio.Event, every_s: float = RENEW_EVERY_S) -> None:
        """Renew every ``every_s`` until ``stop``.

        A Redis error only skips a renewal; the grant is lost when Redis says so, or
        when no renewal succeeded for a whole TTL (the holder cannot know it still leads).

        Raises:
            Fenced: the lease was lost.
        """
        if self.renew_client is not None:
            await self._keep_from_thread(stop, every_s)
            return
        while not stop.is_set():
            try:
                await self.renew()
            except (redis.RedisError, OSError) as exc:
                self._missed(exc)
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    def _missed(self, exc: BaseException) -> None:
        log.warning("scheduler lease not renewed", error=repr(exc))
        if not self.valid():
            raise self.lost(f"no renewal for {self.ttl_s}s") from exc

    async def _keep_from_thread(self, stop: asyncio.Event, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Fenced] = loop.create_future()
        halt = threading.Event()

        def report(exc: Fenced) -> None:
            loop.call_soon_threadsafe(lambda: lost.done() or lost.set_result(exc))

        thread = threading.Thread(
            target=self._renew_loop, args=(halt, every_s, report), name="scheduler-lease", daemon=True
        )
        thread.start()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                raise lost.result()
        finally:
            halt.set()
            stopped.cancel()

    def _renew_loop(self, halt: threading.Event, every_s: float, report: Callable[[Fenced], None]) -> None:
        while not halt.is_set():
            try:
                self._renew_in_thread()
            except Fenced as exc:
                report(exc)
                return
            except (redis.RedisError, OSError) as exc:
                try:
                    self._missed(exc)
                except Fenced as lost:
                    report(lost)
                    return
            halt.wait(every_s)

    async def ensure(self) -> None:
        """Return at once while :meth:`valid`; otherwise renew first (a stalled or
        paused process learns here whether it still leads). Call before any action
        with effects outside the fenced scripts.

        Raises:
            Fenced: the grant is gone.
        """
        if not self.valid():
            await self.renew()

    def lost(self, why: str) -> Fenced:
        """The error for a lost grant (and forget it, so nothing acts on it again)."""
        token, self.value, self._valid_until = self.token, None, 0.0
        return Fenced(f"scheduler lease {self.key} lost (fencing token {token}): {why}")

    async def release(self) -> None:
        """Give the lease up (clean stop), so a standby takes over at once."""
        if self.value is None:
            return
        value, self.value = self.value, None
        try:
            await self._release(keys=[self.key, self.counter_key], args=[value, self.token])
        except (redis.RedisError, OSError):
            pass  # it expires on its own
