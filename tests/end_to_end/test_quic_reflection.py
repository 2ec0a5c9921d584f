"""Amplification and reflection through the real LB and aioquic backends (acceptance A-2, A-3, A-7),
and direct server return through the real LB. A-1 is in test_a1_amplification.py.

A *victim* socket sends probes and only counts what arrives. Silence is
proved with a sentinel: after the probes that must get no answer, one probe
that must be answered is sent; the first datagram the victim receives has to
be that answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from backends.client import EchoClient
from lb.core.encapsulation import encode_proxy_header
from lb.core.quic_constants import GREASE_VERSION
from lb.core.quic_header import parse_routing_fields_untrusted
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.datagrams import long_header, short_header
from quiclb_harness.quic_cluster import QuicCluster


def victim_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5.0)
    return s


def unknown_version(size: int, dcid: bytes, version: int = GREASE_VERSION) -> bytes:
    datagram = long_header(version, dcid, b"\x01" * 8, first_byte=0xC0, pad_to=max(size, 0))
    return datagram[:size] if size < len(datagram) else datagram


def test_a2_small_unknown_versions_get_nothing_and_full_size_gets_one_vn(quic_cluster: QuicCluster) -> None:
    vip = quic_cluster.dep.vip()
    victim = victim_socket()
    small = [unknown_version(size, os.urandom(8)) for size in (26, 100, 600, 1199)]
    for datagram in small:
        victim.sendto(datagram, vip)
    sentinel_dcid = os.urandom(8)
    victim.sendto(unknown_version(1200, sentinel_dcid), vip)
    data, src = victim.recvfrom(4096)
    fields = parse_routing_fields_untrusted(data)
    assert src[:2] == vip
    assert fields.version == 0 and fields.scid == sentinel_dcid  # the VN answers the full-size one
    assert len(data) < 1200  # smaller than its trigger
    victim.settimeout(0.5)
    with pytest.raises(TimeoutError):  # exactly one VN: nothing else is on its way
        victim.recvfrom(4096)
    samples = quic_cluster.lb_metrics()
    assert metric_sum(samples, "quiclb_small_unknown_version_dropped_total") == len(small)
    victim.close()


def test_a3_inbound_version_negotiation_is_never_answered(quic_cluster: QuicCluster) -> None:
    vip = quic_cluster.dep.vip()
    victim = victim_socket()
    for size in (30, 1200, 1400):
        victim.sendto(unknown_version(size, os.urandom(8), version=0), vip)
    sentinel_dcid = os.urandom(8)
    victim.sendto(unknown_version(1200, sentinel_dcid), vip)
    data, _ = victim.recvfrom(4096)
    assert parse_routing_fields_untrusted(data).scid == sentinel_dcid
    assert metric_sum(quic_cluster.lb_metrics(), "quiclb_vn_dropped_total") == 3
    victim.close()


def test_a7_forged_proxy_header_in_client_payload_stays_opaque(quic_cluster: QuicCluster) -> None:
    """A client datagram that starts with a PROXY v2 header is just an unroutable datagram."""
    vip = quic_cluster.dep.vip()
    victim = victim_socket()
    attacker = victim_socket()
    forged = encode_proxy_header(victim.getsockname(), vip) + short_header(os.urandom(17))
    for _ in range(10):
        attacker.sendto(forged, vip)  # to the VIP: parsed as QUIC, never as PROXY
        attacker.sendto(forged, quic_cluster.dep.inside)  # to the inside port: not from a backend
    sentinel_dcid = os.urandom(8)
    victim.sendto(unknown_version(1200, sentinel_dcid), vip)
    data, _ = victim.recvfrom(4096)
    assert parse_routing_fields_untrusted(data).scid == sentinel_dcid
    samples = quic_cluster.lb_metrics()
    assert metric_sum(samples, "quiclb_return_rejected_total", reason="source") == 10
    rejected = {sid: b.stats()["encap_rejected"] for sid, b in quic_cluster.backends.items()}
    assert rejected == {sid: {} for sid in quic_cluster.backends}  # nothing forged ever reached a backend
    victim.close()
    attacker.close()


def test_direct_server_return_through_the_lb(tmp_path: Path) -> None:
    """return_mode = "direct": replies go from the backend straight to the client, with the VIP as source."""
    quic_cluster = QuicCluster(tmp_path, return_mode="direct")
    try:
        quic_cluster.start()
        vip = quic_cluster.dep.vip()

        async def scenario() -> None:
            async with EchoClient.connect(*vip, cadata=quic_cluster.cert_pem) as client:
                assert await client.echo(b"direct") == b"direct"
                assert client.change_cid()
                assert await client.echo(b"after a CID change") == b"after a CID change"
                await client.rebind()
                assert await client.echo(b"after rebinding") == b"after rebinding"

        asyncio.run(asyncio.wait_for(scenario(), 30))
        samples = quic_cluster.lb_metrics()
        # The LB forwarded the client's datagrams but never carried a reply.
        assert metric_sum(samples, "quiclb_cid_routed_total") > 0
        assert metric_sum(samples, "quiclb_tx_to_client_total") == 0
        assert all(b.stats()["unknown_cid_packets"] == 0 for b in quic_cluster.backends.values())
    finally:
        quic_cluster.close()
