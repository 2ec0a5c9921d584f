"""Direct server return (``return_mode = "direct"``, design §4): replies from the VIP, not via the LB.

A QUIC client drops datagrams from any address that is not a known server
path address (RFC 9000 §9; aioquic's ``receive_datagram`` does), so a direct
reply must carry the VIP's IP *and* port as its source. Ordinary sockets
cannot send from an address and port another process owns, so this sender
builds the IPv4 and UDP headers itself and writes them to a raw socket
(``IPPROTO_RAW`` implies ``IP_HDRINCL``; it needs ``CAP_NET_RAW``).

IPv4 only: IPv6 has no ``IP_HDRINCL`` equivalent for arbitrary sources and
forbids a zero UDP checksum. The UDP checksum is computed anyway (cheap with
the modulo trick below); the kernel fills in the IP total length, ID and
header checksum (raw(7)).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from lb.errors import ConfigError

# IPv4 header (RFC 791), 20 bytes without options:
#   B version (4) << 4 | IHL (5 words)     B TOS
#   H total length (kernel fills)          H identification (kernel fills when 0)
#   H flags | fragment offset              B TTL        B protocol (17 = UDP)
#   H header checksum (kernel fills)       4s source    4s destination
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
# UDP header (RFC 768): source port, destination port, length, checksum.
_UDP = struct.Struct(">HHHH")
_DEFAULT_TTL = 64
_DONT_FRAGMENT = 0x4000
_IPPROTO_UDP = 17


def udp_checksum_ipv4(source: bytes, destination: bytes, udp_segment: bytes) -> int:
    """RFC 768 checksum over the IPv4 pseudo-header and the UDP segment (checksum field zero).

    The one's-complement sum of 16-bit words equals the big-endian integer of
    the bytes modulo 0xFFFF (because 2**16 = 1 mod 0xFFFF), except that a
    non-zero multiple of 0xFFFF sums to 0xFFFF rather than 0.
    """
    pseudo = source + destination + struct.pack(">BBH", 0, _IPPROTO_UDP, len(udp_segment))
    data = pseudo + udp_segment
    if len(data) % 2:
        data += b"\x00"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF
    if total == 0 and value != 0:
        total = 0xFFFF
    checksum = ~total & 0xFFFF
    return checksum or 0xFFFF  # 0 means "no checksum"; RFC 768 sends all ones instead


def build_ipv4_udp(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 packet carrying one UDP datagram from ``source`` to ``destination``."""
    src = ipaddress.IPv4Address(source[0]).packed
    dst = ipaddress.IPv4Address(destination[0]).packed
    udp_len = _UDP.size + len(payload)
    segment = _UDP.pack(source[1], destination[1], udp_len, 0) + payload
    checksum = udp_checksum_ipv4(src, dst, segment)
    segment = _UDP.pack(source[1], destination[1], udp_len, checksum) + payload
    ip = _IPV4.pack(0x45, 0, _IPV4.size + udp_len, 0, _DONT_FRAGMENT, _DEFAULT_TTL, _IPPROTO_UDP, 0, src, dst)
    return ip + segment


class DirectReturnSender:
    """Sends UDP datagrams with a forged source (the VIP) through a raw IPv4 socket.

    Raises :class:`ConfigError` at construction when the VIP is not IPv4 or the
    process may not open raw sockets, so the backend fails at start rather
    than on the first reply.
    """

    def __init__(self, vip: tuple[str, int]) -> None:
        try:
            ipaddress.IPv4Address(vip[0])
        except ValueError:
            raise ConfigError(
                f"lb.return_mode = \"direct\" is implemented for IPv4 VIPs only, got {vip[0]!r}"
            ) from None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as exc:
            raise ConfigError(
                f'lb.return_mode = "direct" needs a raw socket (CAP_NET_RAW) to send from the VIP: {exc}'
            ) from exc
        sock.setblocking(False)
        self._sock = sock
        self.vip = vip

    def send(self, payload: bytes, client: tuple[str, int]) -> None:
        """Send ``payload`` to ``client`` from the VIP. Raises ``OSError`` (including
        ``BlockingIOError`` when the socket buffer is full) and ``ValueError`` for an
        IPv6 client."""
        packet = build_ipv4_udp(self.vip, (client[0], client[1]), payload)
        self._sock.sendto(packet, (client[0], 0))

    def close(self) -> None:
        self._sock.close()
