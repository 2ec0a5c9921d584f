"""The CID hook in memory: a client and a server QuicConnection exchange datagrams without sockets."""

from __future__ import annotations

import itertools
import ssl
from types import SimpleNamespace

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from aioquic.quic.packet import pull_quic_transport_parameters

from backends.apps import ECHO_ALPN
from backends.routable_cids import (
    RoutableCidError,
    host_cids,
    install_routable_cids,
    is_unknown_cid,
    peer_cids,
    unique_cid_source,
)
from backends.tls import generate_self_signed
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.core.cid_issuer import CidIssuer
from lb.core.quic_constants import QUIC_V2
from quiclb_harness.loopback_stack import TEST_CID_CONFIG

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 4433)
SERVER_ID = b"\x00\x07"
IDENTITY = generate_self_signed()
MAX_ROUNDS = 50


def make_server(issuer: CidIssuer, odcid: bytes, *, single_cid: bool = False) -> QuicConnection:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ECHO_ALPN], connection_id_length=issuer.cid_len)
    IDENTITY.apply(config)
    server = QuicConnection(configuration=config, original_destination_connection_id=odcid)
    install_routable_cids(server, issuer.next_cid, single_cid=single_cid)
    return server


def handshake(issuer: CidIssuer, *, single_cid: bool = False) -> tuple[QuicConnection, QuicConnection]:
    """Run a handshake in memory; the server is built (and hooked) on the first datagram."""
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN], verify_mode=ssl.CERT_NONE)
    )
    now = 0.0
    client.connect(SERVER_ADDR, now=now)
    server: QuicConnection | None = None
    for _ in range(MAX_ROUNDS):
        moved = False
        for data, _addr in client.datagrams_to_send(now=now):
            if server is None:
                server = make_server(issuer, client.original_destination_connection_id, single_cid=single_cid)
            server.receive_datagram(data, CLIENT_ADDR, now=now)
            moved = True
        assert server is not None
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
            moved = True
        now += 0.001
        if not moved:
            break
    assert server is not None
    return client, server


def test_every_server_cid_decodes_to_the_server_id() -> None:
    issuer = CidIssuer(TEST_CID_CONFIG, SERVER_ID)
    client, server = handshake(issuer)
    issued = peer_cids(client)
    # Sequence 0 (handshake SCID) plus 7 NEW_CONNECTION_ID (client limit 8).
    assert [seq for seq, _ in issued] == list(range(8))
    for _, cid in issued:
        assert len(cid) == TEST_CID_CONFIG.cid_len
        assert decode_server_id(TEST_CID_CONFIG, cid) == SERVER_ID
    assert sorted(cid for _, cid in issued) == sorted(host_cids(server))
    assert issuer.issued == 8


def test_sequence_zero_is_the_initial_source_connection_id() -> None:
    issuer = CidIssuer(TEST_CID_CONFIG, SERVER_ID)
    client, server = handshake(issuer)
    assert server.host_cid == peer_cids(client)[0][1]
    # The client checks initial_source_connection_id against the SCID it saw (RFC 9000 §7.3);
    # a mismatch would have closed the connection instead of completing the handshake.
    kinds = set()
    for _ in range(1000):
        event = client.next_event()
        if event is None:
            break
        kinds.add(type(event))
    assert HandshakeCompleted in kinds
    assert ConnectionTerminated not in kinds


def test_install_twice_or_late_raises() -> None:
    issuer = CidIssuer(TEST_CID_CONFIG, SERVER_ID)
    _client, server = handshake(issuer)
    with pytest.raises(RoutableCidError, match="too late"):
        install_routable_cids(server, issuer.next_cid)
    fresh = make_server(issuer, b"\x01" * 8)
    with pytest.raises(RoutableCidError, match="too late"):
        install_routable_cids(fresh, issuer.next_cid)


def test_wrong_length_is_refused() -> None:
    config = QuicConfiguration(is_client=False, connection_id_length=8)
    IDENTITY.apply(config)
    conn = QuicConnection(configuration=config, original_destination_connection_id=b"\x01" * 8)
    with pytest.raises(RoutableCidError, match="8 bytes"):
        install_routable_cids(conn, lambda: b"\x00" * 9)


def test_unique_source_skips_live_cids_and_gives_up() -> None:
    values = iter([b"a", b"b", b"c"])
    source = unique_cid_source(lambda: next(values), lambda cid: cid in {b"a", b"b"})
    assert source() == b"c"
    counter = itertools.count()
    stuck = unique_cid_source(lambda: bytes([next(counter) % 256]), lambda cid: True, attempts=4)
    with pytest.raises(RoutableCidError, match="4 generated CIDs"):
        stuck()
    assert next(counter) == 4  # exactly `attempts` tries


LIVE = b"L" * 17
SERVER = SimpleNamespace(_protocols={LIVE: object(), b"odcid123": object()})
VERSIONS = frozenset({1, QUIC_V2})


def long_header(first: int, version: int, dcid: bytes) -> bytes:
    return bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + b"\x00" + b"\x00" * 30


@pytest.mark.parametrize(
    ("datagram", "unknown"),
    [
        (b"", False),
        (b"\x40" + LIVE + b"payload", False),
        (b"\x40" + b"X" * 17 + b"payload", True),
        (b"\x40" + LIVE[:5], True),  # shorter than the CID length: aioquic drops it
        (b"\x00" + b"X" * 17, False),  # fixed bit clear: a parse error, not a CID matter
        (long_header(0xC0, 1, b"X" * 8), False),  # v1 Initial may open a connection
        (long_header(0xE0, 1, b"X" * 17), True),  # v1 Handshake, unknown DCID
        (long_header(0xE0, 1, LIVE), False),
        (long_header(0xD0, 1, b"X" * 8), True),  # v1 0-RTT, unknown
        (long_header(0xD0, 1, b"odcid123"), False),  # 0-RTT on the client's original DCID
        (long_header(0xD0, QUIC_V2, b"X" * 8), False),  # v2 Initial is type 0b01 (RFC 9369)
        (long_header(0xC0, QUIC_V2, b"X" * 8), True),  # v2 type 0b00 is Retry
        (long_header(0xE0, 0x1A2A3A4A, b"X" * 8), False),  # unsupported: Version Negotiation
        (b"\xc0\x00\x00", False),
    ],
    ids=[
        "empty", "short-live", "short-unknown", "short-truncated", "fixed-bit-clear", "v1-initial",
        "v1-handshake-unknown", "v1-handshake-live", "v1-0rtt-unknown", "v1-0rtt-odcid", "v2-initial",
        "v2-retry-type", "unsupported-version", "truncated-long",
    ],
)
def test_unknown_cid_classification(datagram: bytes, unknown: bool) -> None:
    assert is_unknown_cid(datagram, 17, VERSIONS, SERVER) is unknown


def test_s2_plaintext_mode_issues_one_cid_and_disables_migration() -> None:
    """Draft -21 §9: with linkable (plaintext) CIDs, only the handshake SCID and disable_active_migration."""
    plain = CidConfig(0, 2, 14)
    issuer = CidIssuer(plain, SERVER_ID)
    client, server = handshake(issuer, single_cid=True)
    issued = peer_cids(client)
    assert [seq for seq, _ in issued] == [0]  # no NEW_CONNECTION_ID at all
    assert decode_server_id(plain, issued[0][1]) == SERVER_ID
    assert issuer.issued == 1
    params = pull_quic_transport_parameters(Buffer(data=server._serialize_transport_parameters()))
    assert params.disable_active_migration is True
    # The default (encrypted) mode advertises migration as usual.
    _c, normal = handshake(CidIssuer(TEST_CID_CONFIG, SERVER_ID))
    normal_params = pull_quic_transport_parameters(Buffer(data=normal._serialize_transport_parameters()))
    assert not normal_params.disable_active_migration
