"""Socket addresses as the LB and the backends compare, hash and print them: one spelling each.

The same peer reaches Python in several spellings: a dual-stack socket reports
an IPv4 client as ``"::ffff:192.0.2.1"``, an IPv6 socket returns 4-tuples, a
link-local address may carry a ``%scope``. Routing (the fallback hash), the
return path's trust checks and the backends' source checks must all agree
that these are one address, so every comparison goes through
:func:`normalize_address` / :func:`canonical_host` here.

Rules: IP literals only (no DNS, ``ValueError`` for anything else); IPv4-mapped
IPv6 folds to IPv4; scope IDs are dropped (they are local to one host); text is
the compressed form (RFC 5952). Parsing costs microseconds, so the canonical
forms are cached, with a bound so a flood of spoofed sources cannot grow memory.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

__all__ = [
    "Address",
    "canonical_host",
    "format_address",
    "ip_version",
    "normalize_address",
    "packed_host",
]

#: ``(IP literal, port)``; after :func:`normalize_address`, the IP is in canonical form.
Address = tuple[str, int]

#: Distinct hosts whose canonical form is remembered (replies and flows repeat a few clients).
CANONICAL_CACHE_SIZE = 65536


def _canonical_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=CANONICAL_CACHE_SIZE)
def canonical_host(host: str) -> str:
    """Canonical text of an IP literal: mapped IPv6 folded to IPv4, scope dropped, compressed.

    Raises ``ValueError`` for text that is not an IP address.
    """
    return _canonical_ip(host).compressed


def normalize_address(address: tuple[str, int] | tuple[str, int, int, int]) -> Address:
    """``(canonical IP text, port)`` from a 2-tuple or an IPv6 socket's 4-tuple.

    Socket APIs report the same peer as ``"::ffff:127.0.0.1"`` or
    ``"127.0.0.1"`` and IPv6 with 4-tuples; comparisons need one spelling.
    """
    return (canonical_host(address[0]), int(address[1]))


def packed_host(host: str) -> bytes:
    """The canonical IP in network byte order: 4 bytes for IPv4 (mapped IPv6 included), else 16."""
    return _canonical_ip(host).packed


def ip_version(host: str) -> int:
    """4 or 6, *as written*: ``"::ffff:192.0.2.1"`` is 6, because a socket for it must be IPv6.

    For choosing a socket family; comparisons use :func:`normalize_address`.
    """
    return ipaddress.ip_address(host.split("%", 1)[0]).version


def format_address(address: Address) -> str:
    """``"127.0.0.1:4433"`` / ``"[::1]:4433"``: the configuration's and the logs' spelling."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
