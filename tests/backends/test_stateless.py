"""backends.stateless in memory: reset tokens in the handshake, reset detection, shared Retry tokens.

Pins the aioquic private names the module relies on (aioquic 1.7.2): an upgrade
that moves them fails here.
"""

from __future__ import annotations

import ssl

from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState

from backends.apps import ECHO_ALPN
from backends.routable_cids import install_routable_cids, peer_cids
from backends.stateless import (
    Resetter,
    RetryTokens,
    SharedRetryTokens,
    end_silently,
    initial_has_token,
    is_stateless_reset,
    peer_reset_tokens,
    reset_token_source,
)
from backends.tls import generate_self_signed
from lb.core.cid_issuer import CidIssuer
from lb.core.retry_token import TokenKey
from lb.core.stateless_packets import build_reset, reset_token
from quiclb_harness.datagrams import initial, short_header
from quiclb_harness.loopback_stack import TEST_CID_CONFIG

SERVER_ID = b"\x00\x07"
RESET_KEY = bytes(range(16))
CLIENT_ADDR = ("127.0.0.1", 40000)
IDENTITY = generate_self_signed()


def handshake() -> tuple[QuicConnection, QuicConnection]:
    issuer = CidIssuer(TEST_CID_CONFIG, SERVER_ID)
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN], verify_mode=ssl.CERT_NONE)
    )
    client.connect(("127.0.0.1", 4433), now=0.0)
    server: QuicConnection | None = None
    for _ in range(50):
        moved = False
        for data, _ in client.datagrams_to_send(now=0.0):
            if server is None:
                config = QuicConfiguration(is_client=False, alpn_protocols=[ECHO_ALPN],
                                           connection_id_length=issuer.cid_len)
                IDENTITY.apply(config)
                server = QuicConnection(configuration=config,
                                        original_destination_connection_id=client.original_destination_connection_id)
                install_routable_cids(server, issuer.next_cid, reset_token=reset_token_source(RESET_KEY, SERVER_ID))
            server.receive_datagram(data, CLIENT_ADDR, now=0.0)
            moved = True
        assert server is not None
        for data, _ in server.datagrams_to_send(now=0.0):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=0.0)
            moved = True
        if not moved:
            break
    assert server is not None
    return client, server


def test_every_cid_the_client_holds_has_the_derived_reset_token() -> None:
    client, server = handshake()
    cids = dict(peer_cids(client))
    tokens = peer_reset_tokens(client)
    assert tokens and sorted(tokens) == sorted(reset_token(RESET_KEY, SERVER_ID, cid) for cid in cids.values())
    server._replenish_connection_ids()  # what aioquic does once the handshake is confirmed
    entries = server._host_cids
    assert len(entries) == 8  # the handshake SCID and seven for NEW_CONNECTION_ID frames
    assert all(e.stateless_reset_token == reset_token(RESET_KEY, SERVER_ID, e.cid) for e in entries)


def test_client_recognises_a_reset_and_ends_without_sending() -> None:
    client, _ = handshake()
    cid = client._peer_cid.cid
    reset = build_reset(reset_token(RESET_KEY, SERVER_ID, cid), 40, bytes(range(24)))
    assert is_stateless_reset(client, reset)
    assert not is_stateless_reset(client, build_reset(reset_token(RESET_KEY, b"\x00\x08", cid), 40, bytes(24)))
    assert not is_stateless_reset(client, reset[:20])
    end_silently(client)
    assert client._state is QuicConnectionState.TERMINATED
    assert client.datagrams_to_send(now=1.0) == []


def test_resetter_answers_only_its_own_cids_shorter_than_the_trigger() -> None:
    issuer = CidIssuer(TEST_CID_CONFIG, SERVER_ID)
    resetter = Resetter(RESET_KEY, SERVER_ID, (TEST_CID_CONFIG,), issuer.cid_len)
    mine = issuer.next_cid()
    other = CidIssuer(TEST_CID_CONFIG, b"\x00\x08").next_cid()
    reset = resetter.reset_for(short_header(mine, 50), CLIENT_ADDR, 0.0)
    assert reset is not None and len(reset) < len(short_header(mine, 50))
    assert reset[-16:] == reset_token(RESET_KEY, SERVER_ID, mine)
    assert resetter.reset_for(short_header(other, 50), CLIENT_ADDR, 0.0) is None
    assert resetter.reset_for(short_header(mine, 2), CLIENT_ADDR, 0.0) is None  # 21 bytes or fewer
    assert resetter.reset_for(initial(1, mine, bytes(8)), CLIENT_ADDR, 0.0) is None  # long headers never


def test_shared_tokens_round_trip_and_count_refusals() -> None:
    counts: dict[str, int] = {}
    handler = SharedRetryTokens(TokenKey.from_secret(bytes(16)), counts, clock=lambda: 1_700_000_000.0)
    token = handler.create_token(address=CLIENT_ADDR, original_destination_connection_id=b"o" * 8,
                                 retry_source_connection_id=b"r" * 8, now=0.0)
    assert handler.validate_token(address=CLIENT_ADDR, destination_cid=b"r" * 8, token=token, now=0.0) == b"o" * 8
    for address, dcid in (((CLIENT_ADDR[0], 1), b"r" * 8), (("127.0.0.2", CLIENT_ADDR[1]), b"r" * 8),
                          (CLIENT_ADDR, b"x" * 8)):
        try:
            handler.validate_token(address=address, destination_cid=dcid, token=token, now=0.0)
        except ValueError:
            continue
        raise AssertionError("accepted a token for another address or DCID")
    assert counts == {"valid": 1, "wrong_address": 1, "invalid": 2}


def test_retry_handler_goes_where_aioquic_reads_it() -> None:
    import asyncio  # noqa: PLC0415

    async def check() -> None:
        server = QuicServer(configuration=QuicConfiguration(is_client=False), retry=False)
        assert server._retry is None  # the attribute aioquic's datagram_received reads
        always = RetryTokens("always", TokenKey.from_secret(bytes(16)), {})
        always.install(server)
        assert server._retry is always.handler and not always.per_datagram
        flood = RetryTokens("flood", TokenKey.from_secret(bytes(16)), {})
        flood.install(server)
        assert server._retry is None and flood.per_datagram
        flood.before_datagram(server, initial(1, bytes(8), bytes(8), token=b"t" * 60))
        assert server._retry is flood.handler
        flood.before_datagram(server, initial(1, bytes(8), bytes(8)))
        assert server._retry is None

    asyncio.run(check())


def test_initial_has_token() -> None:
    assert initial_has_token(initial(1, bytes(8), bytes(8), token=b"t"))
    assert initial_has_token(initial(0x6B3343CF, bytes(8), bytes(8), token=b"t"))
    assert not initial_has_token(initial(1, bytes(8), bytes(8)))
    assert not initial_has_token(short_header(bytes(17)))


def test_tokenless_initials_with_dcids_no_token_can_hold_are_refused() -> None:
    always = RetryTokens("always", TokenKey.from_secret(bytes(16)), {})
    assert always.refuses(initial(1, bytes(7), bytes(8)))
    assert always.refuses(initial(1, b"", bytes(8)))
    assert not always.refuses(initial(1, bytes(8), bytes(8)))
    assert not always.refuses(initial(1, bytes(7), bytes(8), token=b"t" * 60))  # checked, and refused, by aioquic
    assert not RetryTokens("off", None, {}).refuses(initial(1, bytes(7), bytes(8)))
