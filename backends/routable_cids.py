"""Make aioquic issue QUIC-LB routable connection IDs; the only module naming aioquic privates.

aioquic 1.7.2 has no CID-generator hook: the sequence-0 host CID is
``os.urandom(connection_id_length)`` drawn in ``QuicConnection.__init__`` and
every later one comes from ``QuicConnection._replenish_connection_ids``.
``QuicServer.datagram_received`` builds the connection, then calls the public
``create_protocol`` hook, and only afterwards enters ``connection.host_cid``
into its routing dict and feeds the first datagram. So, from
``create_protocol``, :func:`install_routable_cids` can

* overwrite the sequence-0 CID in its three places (``_host_cids[0].cid``,
  ``host_cid``, ``_local_initial_source_connection_id``; the last becomes the
  ``initial_source_connection_id`` transport parameter), and
* shadow the bound method ``_replenish_connection_ids`` with an instance
  attribute that calls the stock method (which picks how many CIDs to issue,
  their sequence numbers and stateless reset tokens) and then swaps the bytes
  of every entry it appended.

The same method runs after handshake completion and after every
RETIRE_CONNECTION_ID, so all NEW_CONNECTION_ID CIDs go through the hook.

Every CID must be exactly ``configuration.connection_id_length`` bytes because
aioquic parses short headers with that one length (one CID length per process).

``QuicServer._protocols`` is a plain dict keyed by every live CID; a new CID
equal to a live one would silently re-point that entry to the new connection,
so the generator checks new CIDs against it (:func:`is_live_cid`).

Why private names are tolerable here: pyproject pins ``aioquic==1.7.2``, the
install fails loudly when the internals look different, and
``tests/backends`` decodes every CID a backend issues, so an upgrade that
moves the internals fails the test suite.

:func:`release_connection` breaks the reference cycles a finished connection
is made of (aioquic's frame-handler table of bound methods, its loss-recovery
and TLS callbacks, ``QuicServer``'s ``functools.partial`` callbacks on the
protocol, and the CID hook's own closures), so reference counting frees it the
moment it ends instead of whenever the cyclic collector gets to it: the
backend's GC tuning (``backends.cli.tune_gc``) makes that minutes or never.

The client-side helpers at the end read the peer (server) CIDs a client
connection holds; they serve the test client in :mod:`backends.client`.
"""

from __future__ import annotations

from collections.abc import Callable

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters

from lb.core.quic_constants import FIXED_BIT, HEADER_FORM_LONG
from lb.core.quic_header import dcid_of_untrusted, parse_routing_fields_untrusted
from lb.errors import MalformedDatagram

#: How often a freshly generated CID may collide with a live one before we give up.
MAX_CID_ATTEMPTS = 8


class RoutableCidError(RuntimeError):
    """The CID hook cannot be installed or cannot produce a usable CID."""


def install_routable_cids(
    conn: QuicConnection,
    next_cid: Callable[[], bytes],
    *,
    single_cid: bool = False,
    hold_new_cids: Callable[[], bool] | None = None,
    reset_token: Callable[[bytes], bytes] | None = None,
) -> None:
    """Make every host CID of ``conn`` come from ``next_cid()``.

    ``reset_token``: the stateless reset token of each CID (the sequence-0 one
    goes out in the ``stateless_reset_token`` transport parameter, later ones in
    NEW_CONNECTION_ID frames); by default aioquic's random tokens stay.

    ``single_cid``: give the client exactly one CID for the life of the
    connection (no NEW_CONNECTION_ID frames) and send the
    ``disable_active_migration`` transport parameter. Draft -21 §9 asks this of
    plaintext configurations (every further CID would be linkable anyway) and
    §3.2 of servers issuing 0b111 CIDs.

    ``hold_new_cids``: asked each time aioquic would top up the connection's
    CIDs; while it returns true no new CID is issued. A reload that makes the
    newest configuration plaintext (or an issuer that ran out of nonces) then
    stops handing linkable or unroutable CIDs to existing connections too.

    Call once, before ``conn`` has handled any datagram: on a server inside
    ``create_protocol``; on a client before ``connect()``. Raises
    :class:`RoutableCidError` when the connection has already issued CIDs (the
    hook would be too late) or when ``next_cid`` returns a CID of the wrong
    length.
    """
    entries = conn._host_cids
    if len(entries) != 1 or entries[0].sequence_number != 0 or getattr(conn, "_quiclb_hooked", False):
        raise RoutableCidError("too late: the connection has already issued connection IDs")
    size = conn.configuration.connection_id_length

    def fresh() -> bytes:
        cid = next_cid()
        if len(cid) != size:  # short headers are parsed with exactly this length
            raise RoutableCidError(f"CID must be {size} bytes (connection_id_length), got {len(cid)}")
        return cid

    first = fresh()
    entries[0].cid = first
    if reset_token is not None:
        entries[0].stateless_reset_token = reset_token(first)
    conn.host_cid = first
    conn._local_initial_source_connection_id = first

    stock = conn._replenish_connection_ids  # bound method of the class

    def replenish() -> None:
        if hold_new_cids is not None and hold_new_cids():
            return
        before = len(conn._host_cids)
        stock()  # aioquic picks the count, the sequence numbers and the reset tokens
        for entry in conn._host_cids[before:]:
            entry.cid = fresh()
            if reset_token is not None:
                entry.stateless_reset_token = reset_token(entry.cid)

    if single_cid:
        _restrict_to_one_cid(conn)
    else:
        conn._replenish_connection_ids = replenish  # type: ignore[method-assign]
    conn._quiclb_hooked = True  # type: ignore[attr-defined]


def _restrict_to_one_cid(conn: QuicConnection) -> None:
    """No CIDs beyond sequence 0, and ``disable_active_migration`` in our transport parameters."""

    def no_new_cids() -> None:
        return None

    conn._replenish_connection_ids = no_new_cids  # type: ignore[method-assign]
    stock = conn._serialize_transport_parameters

    def serialize() -> bytes:
        # aioquic has no setting for this parameter: re-encode its own output with it set.
        params = pull_quic_transport_parameters(Buffer(data=stock()))
        params.disable_active_migration = True
        buf = Buffer(capacity=4096)
        push_quic_transport_parameters(buf, params)
        return buf.data

    conn._serialize_transport_parameters = serialize  # type: ignore[method-assign]


def unique_cid_source(
    next_cid: Callable[[], bytes], is_taken: Callable[[bytes], bool], attempts: int = MAX_CID_ATTEMPTS
) -> Callable[[], bytes]:
    """Wrap ``next_cid`` so that it never returns a CID for which ``is_taken`` is true.

    Raises :class:`RoutableCidError` after ``attempts`` collisions in a row (with a
    non-repeating issuer that means the CID space is far too small).
    """

    def generate() -> bytes:
        for _ in range(attempts):
            cid = next_cid()
            if not is_taken(cid):
                return cid
        raise RoutableCidError(f"{attempts} generated CIDs in a row collided with live CIDs")

    return generate


def is_live_cid(server: QuicServer, cid: bytes) -> bool:
    """Whether ``cid`` is a key of the server's routing dict (a live CID of some connection)."""
    return cid in server._protocols


def live_cid_count(server: QuicServer) -> int:
    """Number of CIDs (host CIDs plus clients' original DCIDs) the server routes."""
    return len(server._protocols)


def _ignore(*_args: object, **_kwargs: object) -> None:
    """Stands in for the callbacks of a finished connection (none of them may run again)."""


def release_connection(protocol: QuicConnectionProtocol) -> None:
    """Cut every reference cycle of a terminated connection so that reference counting frees it.

    Call once the protocol has seen ``ConnectionTerminated`` and the call that
    delivered it has returned (from ``loop.call_soon``): by then ``QuicServer``
    has dropped its CIDs, so no datagram can reach it, and its timer is off.
    Afterwards the connection must not be used; ``tests/backends/test_connection_release.py``
    runs connections with the collector disabled and fails if any one survives,
    which is also what catches an aioquic upgrade adding a cycle.
    """
    for handle in (protocol._timer, protocol._transmit_task):
        if handle is not None:
            handle.cancel()  # a cancelled asyncio handle drops its bound method
    protocol._timer = protocol._transmit_task = None
    # functools.partial(..., protocol=protocol) from QuicServer: protocol -> partial -> protocol.
    protocol._connection_id_issued_handler = _ignore
    protocol._connection_id_retired_handler = _ignore
    protocol._connection_terminated_handler = _ignore
    # The connection is a web of cycles (its frame-handler table of bound methods, its loss
    # recovery's probe callback, partials in its crypto contexts, TLS callbacks, our CID
    # hooks). Emptying its __dict__ cuts them all at once, whatever an aioquic release adds,
    # and anything that still touched the dead connection would fail loudly.
    vars(protocol._quic).clear()


def peer_cids(conn: QuicConnection) -> list[tuple[int, bytes]]:
    """The peer CIDs a connection currently holds: ``(sequence_number, cid)``, in use first.

    For a client these are the server-issued CIDs: sequence 0 is the server's
    handshake SCID, the others came in NEW_CONNECTION_ID frames. The client's own
    random Initial DCID (sequence ``None``) is left out.
    """
    found: list[tuple[int, bytes]] = []
    current = conn._peer_cid
    if current.sequence_number is not None:
        found.append((current.sequence_number, current.cid))
    for spare in conn._peer_cid_available:
        found.append((spare.sequence_number, spare.cid))
    for path in conn._network_paths:  # CIDs reserved for probing a new path
        if path.peer_cid is not None:
            found.append((path.peer_cid.sequence_number, path.peer_cid.cid))
    return found


def current_peer_cid(conn: QuicConnection) -> bytes:
    """The DCID the connection currently sends in short-header packets."""
    return conn._peer_cid.cid


def host_cids(conn: QuicConnection) -> list[bytes]:
    """The host CIDs a connection has issued and not yet seen retired."""
    return [entry.cid for entry in conn._host_cids]


def active_path_address(conn: QuicConnection) -> NetworkAddress | None:
    """The peer address the connection currently sends to (its first network path)."""
    paths = conn._network_paths
    return paths[0].addr if paths else None


def is_unknown_cid(
    datagram: bytes, cid_len: int, supported_versions: frozenset[int], server: QuicServer
) -> bool:
    """Whether ``server`` drops ``datagram`` because its DCID belongs to no live connection.

    Counted: a short header whose DCID, sliced at ``cid_len`` (the one length
    aioquic parses short headers with), is not a live CID, or which is too short
    to hold one; a long header of a supported version that is not an Initial
    (only Initials may open a connection) with an unknown DCID. Not counted:
    unsupported versions (they get Version Negotiation), Initials, headers with
    the fixed bit clear and unparsable long headers (aioquic drops those for
    their form, not their CID). Coalesced packets share the first packet's DCID,
    so only that one is read. The header rules are the LB's own
    (:mod:`lb.core.quic_header`), so both sides read a datagram the same way.
    """
    if not datagram:
        return False
    if datagram[0] & HEADER_FORM_LONG:
        try:
            fields = parse_routing_fields_untrusted(datagram, supported_versions)
        except MalformedDatagram:
            return False
        if fields.version not in supported_versions or fields.is_initial:
            return False
        return fields.dcid not in server._protocols
    if not datagram[0] & FIXED_BIT:
        return False
    try:
        dcid = dcid_of_untrusted(datagram, cid_len)
    except MalformedDatagram:
        return True  # shorter than aioquic's one short-header CID length: it cannot belong to a connection
    return dcid not in server._protocols
