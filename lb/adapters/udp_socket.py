"""UDP sockets for the LB: SO_REUSEPORT groups that are joined on purpose only.

Every VIP and inside socket is bound with ``SO_REUSEPORT`` so that processes
of *this* deployment can share it: the ``--workers`` supervisor's workers, and
an instance started with ``quiclb run --reuse-port`` next to a running one
(scale-out, or a rolling restart: start the new one, stop the old one). That is
safe only because routing is stateless: any instance makes the same decision
for any datagram.

Joining is never silent: by default :func:`bind_udp` first probes the address
with a socket *without* ``SO_REUSEPORT``. The kernel refuses that bind
(``EADDRINUSE``) whenever any socket holds the address - a stale LB of the
same user in a group would otherwise quietly take a share of the VIP's
traffic - and the bind fails with a one-line :class:`~lb.errors.BindError`.
:func:`allow_joining_groups` (the CLI's ``--reuse-port`` and ``--worker``)
turns the probe off for the whole process.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from lb.errors import BindError

#: Generous kernel buffers absorb bursts while the event loop is busy.
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024

_join_existing_groups = False


def allow_joining_groups(allow: bool = True) -> None:
    """Let this process's ``bind_udp(..., reuse_port=True)`` join sockets already bound by others."""
    global _join_existing_groups  # noqa: PLW0603 - one process-wide switch, set once by the CLI
    _join_existing_groups = allow


def joining_groups_allowed() -> bool:
    return _join_existing_groups


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) else socket.AF_INET


def bind_error(address: tuple[str, int], exc: OSError, what: str = "UDP") -> BindError:
    """A one-line :class:`BindError` for a failed bind of ``address``, with the likely cause."""
    reasons = {
        errno.EADDRINUSE: "address already in use by another socket (another LB still running? "
        "check `ss -ulpn`; to share it on purpose, start with --reuse-port)",
        errno.EADDRNOTAVAIL: "not an address of this host (configure it on an interface first)",
        errno.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
        errno.EINVAL: "the kernel refuses this address for a socket (IPv4-mapped or link-local?)",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return BindError(f"cannot bind {what} {_format(address)}: {reason}")


def ensure_unbound(address: tuple[str, int]) -> None:
    """Raise :class:`BindError` if any socket holds ``address`` (probe with an exclusive bind)."""
    host, port = address
    family = _family(host)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise bind_error(address, exc) from None


def bind_udp(
    address: tuple[str, int], *, reuse_port: bool = True, buffer_bytes: int = DEFAULT_BUFFER_BYTES
) -> socket.socket:
    """A non-blocking UDP socket bound to ``address`` (IPv4 or IPv6 literal).

    With ``reuse_port`` the socket joins (or founds) an ``SO_REUSEPORT`` group;
    unless :func:`allow_joining_groups` was called, an address some other
    socket already holds is refused rather than shared (see the module
    docstring). Bind failures raise a one-line :class:`~lb.errors.BindError`.
    """
    host, port = address
    if reuse_port and port != 0 and not _join_existing_groups:
        ensure_unbound(address)
    family = _family(host)
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
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise bind_error(address, exc) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
