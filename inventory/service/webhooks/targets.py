"""SSRF guard: which URLs a webhook may point at, checked at registration and before
every delivery attempt.

A URL must be ``http`` or ``https`` with a host. Unless private targets are allowed
(``INVENTORY_WEBHOOK_ALLOW_PRIVATE=true``), every address the host resolves to must be
globally routable: loopback, private, link-local, shared (CGNAT), unspecified,
multicast and reserved ranges are refused, IPv4-mapped IPv6 addresses by their IPv4
meaning. Checking at delivery time as well defeats DNS rebinding (a name that resolved
to a public address at registration and to ``127.0.0.1`` later); the delivery then
connects to the address that was checked, not to a second resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ...domain.model import ValidationFailed

__all__ = ["MAX_URL", "Target", "TargetRefused", "address_allowed", "parse_url", "resolve"]

MAX_URL = 2048
_DNS_TIMEOUT = 5.0


class TargetRefused(Exception):
    """The URL's host is not a permitted delivery target (or does not resolve)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked destination: connect to ``address``, present ``host`` (Host, SNI)."""

    url: SplitResult
    address: str


def parse_url(url: str) -> SplitResult:
    """Split and check the form of a webhook URL; :class:`ValidationFailed` if bad."""
    if len(url) > MAX_URL or any(c in url for c in " \t\r\n\x00"):
        raise ValidationFailed(
            f"url must be at most {MAX_URL} characters without white space", {"field": "url"}
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValidationFailed("url is not a valid URL", {"field": "url"}) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("url must be an http or https URL with a host", {"field": "url"})
    return parts


def address_allowed(address: str) -> bool:
    """True for a globally routable unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve(url: SplitResult, allow_private: bool) -> Target:
    """Resolve the URL's host and check every address; :class:`TargetRefused` if any
    is not allowed (a name with one private address among public ones is refused:
    the connection could land on any of them)."""
    host = url.hostname
    assert host is not None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
            _DNS_TIMEOUT,
        )
    except (OSError, TimeoutError, UnicodeError):
        raise TargetRefused("the url's host does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise TargetRefused("the url's host does not resolve")
    if not allow_private:
        refused = [a for a in addresses if not address_allowed(a)]
        if refused:
            raise TargetRefused(
                "the url's host resolves to a loopback, private, link-local or reserved "
                "address (INVENTORY_WEBHOOK_ALLOW_PRIVATE=true allows it)"
            )
    return Target(url, addresses[0])
