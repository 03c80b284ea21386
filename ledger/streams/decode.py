"""Reading token events off the topic: a :class:`TokenEvent`, or the reason it is bad.

Bad records never stop the stream: the processor sends them to the dead-letter topic
with the reason and moves on. A ``finished`` event must carry what billing and the SLA
figures need (``submitted_at`` and ``finished_at``); other kinds are only validated.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill import wire
from tokenmill.errors import SchemaError
from tokenmill.wire import EventKind, TokenEvent


@dataclass(frozen=True)
class Rejected:
    """A record that cannot be processed, and why (goes to the dead-letter topic)."""

    reason: str


def parse(raw: bytes | None) -> TokenEvent | Rejected:
    """Decode one record's value.

    Returns:
        The event, or :class:`Rejected` with a one-line reason (schema errors name the
        field, e.g. ``TokenEvent: completion_tokens: Input should be ...``).
    """
    if not raw:
        return Rejected("empty message")
    try:
        event = wire.decode(TokenEvent, raw)
    except SchemaError as exc:  # UnsupportedSchemaVersion included
        return Rejected(f"{type(exc).__name__}: {exc}")
    if event.kind is EventKind.finished and (event.submitted_at is None
                                              or event.finished_at is None):  # fmt: skip
        missing = [f for f in ("submitted_at", "finished_at") if getattr(event, f) is None]
        if missing:
            return Rejected(f"SchemaError: finished event lacks {', '.join(missing)}")
    return event
