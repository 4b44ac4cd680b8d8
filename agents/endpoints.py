"""Push endpoints that cannot reach inside the platform's network (docs/SECURITY.md).

An external agent's endpoint_url comes from a tenant's operator: the gateway must never be made to
POST to a database, a metadata service or anything else on the platform's side. So a URL is
checked when it is registered and again at every push, on the addresses its host resolves to
*now*, and the push connects to the address that was checked (`pinned()`), sending the host name
only as the Host header and the TLS server name: a DNS answer that changes between the check and
the connection (rebinding) cannot redirect it.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

# Cloud metadata services, refused even where an operator allows their network.
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}


class EndpointRefused(ValueError):
    """The URL may not be pushed to; the message says why, without the addresses it resolved to."""


@dataclass(frozen=True)
class Pinned:
    """Where one push goes: the URL with the checked address in place of the host, and the host
    name for the Host header and TLS (SNI and certificate verification)."""

    url: str
    host_header: str
    server_name: str


def check_url(url: str) -> str:
    """The URL, normalised, if it may be registered; EndpointRefused otherwise."""
    parts = _parse(url)
    _resolve(parts.hostname, parts.port or _default_port(parts.scheme))
    return urlunsplit((parts.scheme, parts.netloc.lower(), parts.path, "", ""))


def pinned(url: str) -> Pinned:
    """Check `url` again and fix the address to connect to."""
    parts = _parse(url)
    port = parts.port or _default_port(parts.scheme)
    address = _resolve(parts.hostname, port)
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    return Pinned(
        url=urlunsplit((parts.scheme, netloc, parts.path, "", "")),
        host_header=parts.netloc.lower(),
        server_name=parts.hostname,
    )


def _parse(url: str):
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise EndpointRefused("not a valid URL") from None
    schemes = ("https", "http") if settings.EAP_ENDPOINT_ALLOW_HTTP else ("https",)
    if parts.scheme not in schemes:
        raise EndpointRefused(f"the URL must use {' or '.join(schemes)}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise EndpointRefused("the URL must not carry credentials")
    if not parts.hostname:
        raise EndpointRefused("the URL has no host")
    if parts.query or parts.fragment:
        raise EndpointRefused("the URL must not have a query or a fragment")
    return parts


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _resolve(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The first address `host` resolves to, if every one it resolves to is allowed: a name that
    also resolves inside is refused, whichever address a client would pick."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise EndpointRefused("the host does not resolve") from None
    addresses = [_unwrapped(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos]
    if not addresses or not all(_allowed(address) for address in addresses):
        raise EndpointRefused(
            "the host resolves to a loopback, private, link-local, unique-local, multicast, reserved or "
            "metadata address"
        )
    return addresses[0]


def _unwrapped(address):
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _allowed(address) -> bool:
    if address in METADATA or address.is_multicast or address.is_unspecified:
        return False
    if any(address in network for network in allowed_networks()):
        return True
    return address.is_global


def allowed_networks() -> list:
    return [ipaddress.ip_network(network, strict=False) for network in settings.EAP_ENDPOINT_ALLOW_NETWORKS]
