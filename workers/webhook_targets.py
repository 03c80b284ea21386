"""Where webhooks may go: one policy, checked when a webhook is submitted (a request's
``webhook``, a batch's) and again at every delivery attempt.

Never allowed, whatever the settings: URLs that are not http(s); cloud metadata
services (169.254.169.254, fd00:ec2::254, fd20:ce::254, 100.100.100.200,
168.63.129.16); link-local, multicast and unspecified addresses (``0.0.0.0`` and ``::``
reach this host); reserved and other addresses not routable on the internet.

Refused unless a setting opens them, each switch opening only its own kind:

* loopback (127.0.0.0/8, ``::1``, ``localhost``): ``webhooks.allow_loopback`` — the
  local example config sets it, so receivers on this machine work;
* private networks (10/8, 172.16/12, 192.168/16, CGNAT 100.64/10, unique-local
  fc00::/7, site-local fec0::/10): ``webhooks.allow_private_targets``.

An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
``64:ff9b::/96``, 6to4 ``2002::/16``) is judged by that IPv4 address as well.

When: at submission :func:`check_target` checks the scheme, literal addresses (also
the numeric forms the C resolver reads as IPv4: ``2130706433``, ``127.1``,
``0x7f.1``) and ``localhost`` names, and accepts any other host name without looking
it up: it may not resolve yet, and what it resolves to now says nothing about later.
At every attempt :func:`pin_target` looks the name up once, refuses it if any answer is
refused, and pins the connection to the checked address (a name answering differently
on a second lookup — DNS rebinding — cannot reach a refused address). A name that does
not resolve at an attempt fails that attempt (:class:`TargetUnresolved`, retried like
an unreachable receiver); a refused target ends the delivery.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ..errors import TokenmillError, ValidationError

if TYPE_CHECKING:
    from ..config.models import WebhookSettings

__all__ = ["PinnedTarget", "Resolver", "TargetRefused", "TargetUnresolved", "check_target", "pin_target",
           "refusal"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]  # socket.getaddrinfo's signature

LOOPBACK = "loopback"
PRIVATE = "private"

_net = ipaddress.ip_network
_METADATA = frozenset(map(ipaddress.ip_address, (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "fd20:ce::254", "100.100.100.200", "168.63.129.16",
)))  # fmt: skip
#: (kind, networks), the first match wins (metadata is checked before all of them)
_KINDS: tuple[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...] = (
    ("unspecified", (_net("0.0.0.0/8"), _net("::/128"))),
    (LOOPBACK, (_net("127.0.0.0/8"), _net("::1/128"))),
    ("link-local", (_net("169.254.0.0/16"), _net("fe80::/10"))),
    ("multicast", (_net("224.0.0.0/4"), _net("ff00::/8"))),
    (PRIVATE, (_net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"), _net("100.64.0.0/10"),
               _net("fc00::/7"), _net("fec0::/10"))),
    # IPv4-compatible ::a.b.c.d (deprecated), which Python counts as global
    ("reserved", (_net("::/96"),)),
)
_NAT64 = _net("64:ff9b::/96")
_HINT = {LOOPBACK: "set webhooks.allow_loopback to allow it",
         PRIVATE: "set webhooks.allow_private_targets to allow it"}


class TargetRefused(ValidationError):
    """A webhook URL that tokenmill will not call (its scheme, or where it points)."""


class TargetUnresolved(TokenmillError):
    """A webhook host name that did not resolve at an attempt (the attempt fails and is
    retried: the name may resolve later)."""


def _kind(ip: Address) -> str | None:
    """What kind of non-public address ``ip`` is; None for a public one."""
    if ip in _METADATA:
        return "cloud metadata"
    for kind, networks in _KINDS:
        if any(ip in n for n in networks):
            return kind
    # Python's table of special-purpose ranges (documentation, benchmarking, 240/4 …).
    return None if ip.is_global else "reserved"


def _judged(ip: Address) -> Iterator[Address]:
    """``ip`` and the IPv4 address it carries, if any (what a connection reaches)."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # a zone (fe80::1%eth0) would defeat the lookups
        if ip.ipv4_mapped is not None:
            yield ip.ipv4_mapped  # the socket connects to the IPv4 address itself
            return
        if ip in _NAT64:
            yield ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            yield ip.sixtofour
    yield ip


def refusal(ip: Address, policy: WebhookSettings) -> str | None:
    """Why ``ip`` may not receive webhooks under ``policy`` (the kind of address it is:
    ``"loopback"``, ``"private"``, ``"cloud metadata"`` …), or None when it may."""
    for addr in _judged(ip):
        kind = _kind(addr)
        if (kind == LOOPBACK and policy.allow_loopback) or (kind == PRIVATE and policy.allow_private_targets):
            continue
        if kind is not None:
            return kind
    return None


def _refuse(host: str, addresses: list[Address], policy: WebhookSettings) -> None:
    for ip in addresses:
        kind = refusal(ip, policy)
        if kind is not None:
            hint = _HINT.get(kind, "never allowed")
            raise TargetRefused(f"webhook: {host!r} is a {kind} address ({ip}); {hint}", field="webhook")


def _literal(host: str) -> Address | None:
    """The address ``host`` spells, canonically or as the C resolver reads it."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton reads 2130706433, 127.1 and 0x7f.0.0.1 as 127.0.0.1, as getaddrinfo does.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _parts(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number or out of range)
    except ValueError:
        raise TargetRefused(f"webhook: not a valid URL: {url!r}", field="webhook") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"webhook: must be an http(s) URL, got {url!r}", field="webhook")
    return parts


def check_target(url: str, policy: WebhookSettings) -> str:
    """What can be told without a lookup: the scheme, literal addresses and ``localhost``
    names (at submission, and first at every attempt).

    Returns:
        ``url``.

    Raises:
        TargetRefused: naming the reason (``field="webhook"``).
    """
    host = (_parts(url).hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        _refuse(host, [ipaddress.IPv4Address("127.0.0.1")], policy)
    literal = _literal(host)
    if literal is not None:
        _refuse(host, [literal], policy)
    return url


@dataclass(frozen=True)
class PinnedTarget:
    """Where one POST goes: ``url`` with its host name replaced by an address that was
    checked, so the connection goes where the check looked."""

    url: str
    #: the ``Host`` header and TLS server name: the name the URL had
    headers: dict[str, str]
    extensions: dict[str, Any]


def pin_target(url: str, policy: WebhookSettings, *, resolve: Resolver = socket.getaddrinfo) -> PinnedTarget:
    """Check ``url`` on one lookup of its host (at each attempt), and pin it there.

    Raises:
        TargetRefused: the policy refuses it (the delivery ends).
        TargetUnresolved: the name has no address now (the attempt fails).
    """
    check_target(url, policy)
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return PinnedTarget(url, {}, {})  # a canonical literal, checked above
    except ValueError:
        pass
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolve(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise TargetUnresolved(f"webhook: cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise TargetUnresolved(f"webhook: {host!r} resolves to no address")
    addresses: list[Address] = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    _refuse(host, addresses, policy)
    ip = addresses[0]
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = (f"[{ip}]" if ip.version == 6 else str(ip)) + (f":{parts.port}" if parts.port else "")
    pinned = urlunsplit(parts._replace(netloc=(userinfo + "@" if userinfo else "") + netloc))
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    return PinnedTarget(pinned, {"host": hostport}, extensions)
