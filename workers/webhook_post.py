"""One webhook POST under a total deadline, reading at most a capped response body.

httpx's timeouts are per phase (connect, each write, each read), so a receiver that
trickles its answer a byte at a time, or streams an endless body, could hold an
attempt open for ever — past the delivery lock, so that a second copy posts the same
message while the first is still in flight. Here one ``asyncio.timeout`` covers the
whole attempt: the host name lookup, connecting, sending, the status line and headers,
and reading at most :data:`RESPONSE_CAP_BYTES` of the body (which is then dropped: only
the status counts). At the deadline the connection is closed. The caller sizes the
deadline to end before its lock does (:mod:`.webhook_attempt`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from ..config.models import WebhookSettings
from ..errors import ValidationError
from .webhook_targets import Resolver, TargetUnresolved, pin_target

__all__ = ["RESPONSE_CAP_BYTES", "Outcome", "Poster"]

#: the most of a response body an attempt reads (the status alone decides the outcome)
RESPONSE_CAP_BYTES = 64 * 1024
#: how much of an error message is kept in the ledger
ERROR_CHARS = 500


@dataclass(frozen=True)
class Outcome:
    """What one POST came to."""

    #: the receiver's HTTP status, or None when it never answered
    status_code: int | None
    #: why the attempt failed (None when the receiver accepted it)
    error: str | None
    #: the target is refused: retrying cannot help
    permanent: bool
    duration_ms: float

    @property
    def accepted(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass
class Poster:
    """Posts signed webhook bodies; safe to share between threads (each attempt runs on
    its own event loop, with its own connection)."""

    policy: WebhookSettings
    #: the host name lookup (``socket.getaddrinfo``; tests give names their answers)
    resolve: Resolver = socket.getaddrinfo
    cap_bytes: int = RESPONSE_CAP_BYTES
    #: built once: loading the CA bundle for every attempt costs tens of milliseconds
    tls: ssl.SSLContext = field(default_factory=httpx.create_ssl_context)
    #: runs the blocking lookups, so the deadline covers them too (one stuck past the
    #: deadline is abandoned, its thread left to finish)
    lookups: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-lookup"))

    def post(self, url: str, headers: dict[str, str], body: bytes, *, deadline_s: float) -> Outcome:
        """POST ``body`` to ``url`` (checked and pinned per the target policy); returns
        within ``deadline_s`` (plus the event loop's own start and stop)."""
        return asyncio.run(self._post(url, headers, body, deadline_s))

    async def _post(self, url: str, headers: dict[str, str], body: bytes, deadline_s: float) -> Outcome:
        started = time.monotonic()

        def outcome(code: int | None, error: str | None, permanent: bool = False) -> Outcome:
            return Outcome(code, error, permanent, (time.monotonic() - started) * 1000)

        code: int | None = None
        try:
            async with asyncio.timeout(deadline_s):
                lookup = self.lookups.submit(pin_target, url, self.policy, resolve=self.resolve)
                target = await asyncio.wrap_future(lookup)
                # trust_env off: the POST goes to the address just checked, not to a proxy.
                async with httpx.AsyncClient(verify=self.tls, timeout=deadline_s, follow_redirects=False,
                                             trust_env=False) as client:
                    request = client.build_request("POST", target.url, content=body,
                                                   headers={**headers, **target.headers},
                                                   extensions=target.extensions)
                    response = await client.send(request, stream=True)
                    try:
                        code = response.status_code
                        read = 0
                        async for chunk in response.aiter_raw():
                            read += len(chunk)
                            if read >= self.cap_bytes:
                                break
                    finally:
                        await response.aclose()
        except TimeoutError:
            if code is None:
                return outcome(None, f"Timeout: no answer within the attempt's {deadline_s:.3g} s deadline")
            # The status came in time; only reading its body was cut short.
        except (ValidationError, httpx.InvalidURL) as exc:  # refused by the policy, or unusable
            return outcome(None, str(exc)[:ERROR_CHARS], permanent=True)
        except TargetUnresolved as exc:
            return outcome(None, str(exc)[:ERROR_CHARS])
        except httpx.HTTPError as exc:
            if code is None:
                return outcome(None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
        return outcome(code, None if 200 <= (code or 0) < 300 else f"HTTP {code}")
