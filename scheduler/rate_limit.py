"""Per-tenant rate limits as token buckets (requests/min and tokens/min).

A bucket holds up to one minute's allowance and refills continuously. A request larger
than a whole bucket may go when the bucket is full (it then runs into debt), so no request
is held for ever. Tokens are charged at dispatch from the estimate and corrected at
completion, as the fair-share counters are.
"""

from __future__ import annotations


class TokenBucket:
    """A continuously refilling allowance of ``per_minute`` units per minute."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp: float | None = None

    def refill(self, now: float) -> None:
        if self.stamp is None:
            self.stamp = now
        elif now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def can_take(self, now: float, amount: float) -> bool:
        self.refill(now)
        return self.level >= min(amount, self.capacity)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Credit (or, if negative, debit) units, e.g. when an estimate was too high."""
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """A tenant's request and token buckets; either may be absent (unlimited)."""

    __slots__ = ("requests", "tokens")

    def __init__(self, requests_per_min: int | None, tokens_per_min: int | None) -> None:
        self.requests = TokenBucket(requests_per_min) if requests_per_min else None
        self.tokens = TokenBucket(tokens_per_min) if tokens_per_min else None

    def allows(self, now: float, tokens: int) -> bool:
        """Whether one request of ``tokens`` tokens may be dispatched now."""
        if self.requests is not None and not self.requests.can_take(now, 1.0):
            return False
        return self.tokens is None or self.tokens.can_take(now, float(tokens))

    def take(self, tokens: int) -> None:
        if self.requests is not None:
            self.requests.take(1.0)
        if self.tokens is not None:
            self.tokens.take(float(tokens))

    def correct(self, extra_tokens: int) -> None:
        """Charge the difference between actual and estimated tokens at completion."""
        if self.tokens is not None and extra_tokens:
            self.tokens.give_back(-float(extra_tokens))
