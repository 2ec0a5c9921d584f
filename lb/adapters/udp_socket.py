"""UDP sockets for the LB: SO_REUSEPORT so several LB processes share VIPs and the inside port."""

from __future__ import annotations

import socket

from lb.core.addresses import ip_version

#: Generous kernel buffers absorb bursts while the event loop is busy.
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024


def bind_udp(
    address: tuple[str, int], *, reuse_port: bool = True, buffer_bytes: int = DEFAULT_BUFFER_BYTES
) -> socket.socket:
    """A non-blocking UDP socket bound to ``address`` (IPv4 or IPv6 literal).

    With ``reuse_port`` every LB instance (and ``--workers`` process) binds the
    same VIP and inside address; the kernel spreads datagrams among them by
    4-tuple hash. That is safe only because routing is stateless: any instance
    makes the same decision for any datagram.
    """
    host, port = address
    family = socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
            except OSError:
                pass  # capped by net.core.*mem_max: not fatal
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
