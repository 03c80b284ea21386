"""The webhook target policy (:mod:`tokenmill.workers.webhook_targets`), as pure
functions: properties over IP addresses, URLs, and the shipped example config at the
submission and delivery checks. No services needed."""

from __future__ import annotations

import ipaddress
import socket
from itertools import product

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenmill.config import EXAMPLE_CONFIG, load_settings
from tokenmill.config.models import WebhookSettings
from tokenmill.producers.requests import build_request
from tokenmill.workers.webhook_targets import (
    TargetRefused,
    TargetUnresolved,
    check_target,
    pin_target,
    refusal,
)

CLOSED = WebhookSettings()
LOOPBACK = WebhookSettings(allow_loopback=True)
PRIVATE = WebhookSettings(allow_private_targets=True)
OPEN = WebhookSettings(allow_loopback=True, allow_private_targets=True)
POLICIES = (CLOSED, LOOPBACK, PRIVATE, OPEN)
policies = st.sampled_from(POLICIES)

METADATA = ["169.254.169.254", "fd00:ec2::254", "fd20:ce::254", "100.100.100.200", "168.63.129.16",
            "169.254.170.2"]


def nets(*cidrs: str) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return st.one_of(*(st.ip_addresses(network=c) for c in cidrs))


def url_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int = 8080) -> str:
    return f"http://{f'[{ip}]' if ip.version == 6 else ip}:{port}/hook"


def mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"::ffff:{ip}")


def nat64(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip))


# -- the address policy ------------------------------------------------------------------


@given(nets("127.0.0.0/8", "::1/128"), policies)
def test_loopback_opens_only_with_allow_loopback(ip, policy) -> None:
    assert refusal(ip, policy) == (None if policy.allow_loopback else "loopback")


@given(nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"), policies)
def test_private_ranges_open_only_with_allow_private_targets(ip, policy) -> None:
    if str(ip) in METADATA:
        return
    assert refusal(ip, policy) == (None if policy.allow_private_targets else "private")


@given(nets("169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8", "0.0.0.0/8", "::/128",
            "240.0.0.0/4", "192.0.2.0/24", "198.18.0.0/15", "2001:db8::/32"), policies)
def test_link_local_multicast_unspecified_and_reserved_are_never_allowed(ip, policy) -> None:
    assert refusal(ip, policy) is not None


@pytest.mark.parametrize(("address", "policy"), list(product(METADATA, POLICIES)))
def test_cloud_metadata_is_never_allowed(address: str, policy: WebhookSettings) -> None:
    ip = ipaddress.ip_address(address)
    assert refusal(ip, policy) == "cloud metadata"
    with pytest.raises(TargetRefused, match="cloud metadata"):
        check_target(url_of(ip), policy)
    if ip.version == 4:
        assert refusal(mapped(ip), policy) == "cloud metadata"


@given(st.ip_addresses(v=4), policies)
def test_ipv4_carried_in_ipv6_is_judged_as_itself(ip, policy) -> None:
    assert refusal(mapped(ip), policy) == refusal(ip, policy)
    if refusal(ip, policy) is not None:
        assert refusal(nat64(ip), policy) is not None


@given(st.ip_addresses())
def test_the_switches_only_open_and_what_the_default_allows_is_global(ip) -> None:
    verdicts = {p: refusal(ip, p) for p in POLICIES}
    if verdicts[CLOSED] is None:
        assert all(v is None for v in verdicts.values())
        assert (ip.ipv4_mapped or ip).is_global if ip.version == 6 else ip.is_global
    if verdicts[OPEN] is not None:  # neither switch opened it: nothing else does
        assert all(v is not None for v in verdicts.values())


@given(st.ip_addresses(v=4).filter(lambda ip: ip.is_global and not ip.is_multicast), policies)
def test_public_ipv4_is_allowed_everywhere(ip, policy) -> None:
    if str(ip) not in METADATA:
        assert refusal(ip, policy) is None


# -- URLs at submission -------------------------------------------------------------------


@given(st.ip_addresses(), policies, st.integers(1, 65535))
def test_a_literal_url_is_refused_exactly_when_its_address_is(ip, policy, port) -> None:
    url = url_of(ip, port)
    if refusal(ip, policy) is None:
        assert check_target(url, policy) == url
    else:
        with pytest.raises(TargetRefused) as caught:
            check_target(url, policy)
        assert caught.value.field == "webhook"


@given(st.ip_addresses(v=4), policies)
def test_numeric_forms_the_resolver_reads_are_judged_as_their_address(ip, policy) -> None:
    for spelled in (str(int(ip)), hex(int(ip))):
        url = f"http://{spelled}/hook"
        if refusal(ip, policy) is None:
            check_target(url, policy)
        else:
            with pytest.raises(TargetRefused):
                check_target(url, policy)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "hooks.localhost", "127.1", "0x7f.1", "0177.0.0.1"])
def test_localhost_names_and_short_forms_are_loopback(host: str) -> None:
    with pytest.raises(TargetRefused, match="loopback.*allow_loopback"):
        check_target(f"http://{host}:9000/h", CLOSED)
    check_target(f"http://{host}:9000/h", LOOPBACK)


@pytest.mark.parametrize("url", ["ftp://example.com/h", "file:///etc/passwd", "http:///nohost", "javascript:alert(1)",
                                 "gopher://127.0.0.1:6379/_", "http://example.com:99999/h", "http://[::1/h"])
def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(TargetRefused, match="http|URL"):
        check_target(url, OPEN)


def test_names_are_accepted_unresolved_at_submission() -> None:
    # A name may not resolve yet: it is looked up (and checked) at every attempt instead.
    assert check_target("https://hooks.invalid/x", CLOSED) == "https://hooks.invalid/x"


# -- at each attempt ----------------------------------------------------------------------


def answers(table: dict[str, list[str]]):
    def resolve(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in table[host]]

    return resolve


def test_a_name_is_refused_when_any_answer_is_and_pinned_to_a_checked_one() -> None:
    resolve = answers({"hooks.test": ["93.184.216.34", "10.1.2.3"], "meta.test": ["169.254.169.254"],
                       "lo.test": ["::1"], "ok.test": ["2606:2800:220:1::1"]})
    with pytest.raises(TargetRefused, match="private.*10.1.2.3"):
        pin_target("http://hooks.test/x", LOOPBACK, resolve=resolve)
    assert pin_target("http://hooks.test/x", PRIVATE, resolve=resolve).url == "http://93.184.216.34/x"
    for policy in POLICIES:
        with pytest.raises(TargetRefused, match="cloud metadata"):
            pin_target("http://meta.test/x", policy, resolve=resolve)
    with pytest.raises(TargetRefused, match="loopback"):
        pin_target("http://lo.test/x", PRIVATE, resolve=resolve)
    target = pin_target("https://ok.test/x", CLOSED, resolve=resolve)
    assert (target.url, target.headers, target.extensions) == (
        "https://[2606:2800:220:1::1]/x", {"host": "ok.test"}, {"sni_hostname": "ok.test"})


def test_a_name_that_does_not_resolve_fails_the_attempt_without_refusing_it() -> None:
    with pytest.raises(TargetUnresolved, match="cannot resolve"):
        pin_target("http://later.test/x", CLOSED, resolve=answers({}))
    assert not issubclass(TargetUnresolved, TargetRefused)  # retried, not dead-lettered


# -- the shipped example config ---------------------------------------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch, tmp_path):
    for name in ("TOKENMILL_CONFIG", "TOKENMILL_WEBHOOKS__ALLOW_LOOPBACK", "TOKENMILL_WEBHOOKS__ALLOW_PRIVATE_TARGETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    return load_settings(home=tmp_path / "home")


def test_the_example_config_accepts_loopback_and_refuses_private_and_metadata(example) -> None:
    policy = example.webhooks
    assert (policy.allow_loopback, policy.allow_private_targets) == (True, False)
    assert WebhookSettings() == CLOSED and not CLOSED.allow_loopback  # off by default
    port = 43210

    def submit(url: str):
        return build_request(example, tenant="alpha", model="sim", prompt="hi", webhook=url)

    # at submission (a request's webhook) and at an attempt (no lookup for literals)
    assert submit(f"http://127.0.0.1:{port}/hook").webhook_url == f"http://127.0.0.1:{port}/hook"
    assert pin_target(f"http://127.0.0.1:{port}/hook", policy).url == f"http://127.0.0.1:{port}/hook"
    for url, kind in (("http://10.0.0.1/hook", "private"), ("http://169.254.169.254/latest/meta-data", "cloud metadata")):
        with pytest.raises(TargetRefused, match=kind) as caught:
            submit(url)
        assert caught.value.field == "webhook"
        with pytest.raises(TargetRefused, match=kind):
            pin_target(url, policy)
