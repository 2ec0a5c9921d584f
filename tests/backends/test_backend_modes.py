"""Direct server return, reload, and metrics of an in-process backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.client import EchoClient
from backends.dsr import DirectReturnSender, build_ipv4_udp, udp_checksum_ipv4
from backends.metrics import MetricsServer, render_prometheus
from backends.settings import RETURN_DIRECT, RETURN_VIA_LB, BackendSettings
from backends.stats import BackendStats
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.errors import ConfigError
from quiclb_harness.loopback_stack import TEST_CID_CONFIG, loopback_stack

SID = b"\x00\x01"
CONFIG_1 = CidConfig(config_id=1, server_id_len=2, nonce_len=14, key=bytes(range(16)))


def raw_sockets_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return False
    return True


needs_raw = pytest.mark.skipif(not raw_sockets_allowed(), reason="direct return needs CAP_NET_RAW")


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF


@pytest.mark.parametrize("size", [0, 1, 2, 3, 100, 1199, 1200, 1451])
def test_udp_checksum_matches_the_word_sum(size: int) -> None:
    src, dst = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 9])
    payload = bytes((i * 7 + size) % 256 for i in range(size))
    segment = struct.pack(">HHHH", 4433, 5555, 8 + size, 0) + payload
    pseudo = src + dst + struct.pack(">BBH", 0, 17, len(segment))
    assert udp_checksum_ipv4(src, dst, segment) == reference_checksum(pseudo + segment)
    packet = build_ipv4_udp(("127.0.0.1", 4433), ("127.0.0.9", 5555), payload)
    assert len(packet) == 28 + size
    assert packet[12:16] == src and packet[16:20] == dst and packet[9] == 17
    # A receiver's sum over pseudo-header + segment (with checksum) is all ones.
    assert reference_checksum(pseudo + packet[20:]) in (0xFFFF, 0)


@needs_raw
def test_direct_return_sends_from_the_vip(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack([SID], return_mode=RETURN_DIRECT) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata
        ) as client:
            assert await client.echo(b"direct") == b"direct"
            await client.rebind()
            big = b"z" * 50_000
            assert await client.echo(big) == big
            await client.migrate("127.0.0.2")
            assert await client.echo(b"moved") == b"moved"
            assert stack.lb.counters["to_client"] == 0  # nothing came back through the relay
            backend = stack.backends[0]
            assert backend.stats.datagrams_out > 0
            assert backend.stats.unknown_cid_packets == 0
            assert backend.stats.send_errors == 0

    arun(scenario())


def test_direct_mode_refuses_an_ipv6_vip() -> None:
    with pytest.raises(ConfigError, match="IPv4 VIPs only"):
        DirectReturnSender(("::1", 4433))


def test_reload_rotates_config_and_keeps_connections(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        configs = [TEST_CID_CONFIG]
        async with loopback_stack([SID], cid_configs=(TEST_CID_CONFIG, CONFIG_1)) as stack:
            backend = stack.backends[0]
            # Start on config 0 only; the relay already decodes both (LBs get a config first).
            first = dataclasses.replace(backend.settings, cid_configs=(TEST_CID_CONFIG,))
            backend.apply_settings(first)

            def source() -> BackendSettings:
                return dataclasses.replace(backend.settings, cid_configs=tuple(configs))

            backend.reload_source = source
            async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as old:
                assert old.dcid[0] >> 5 == 0
                configs.append(CONFIG_1)
                assert backend.reload()
                async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as new:
                    assert new.dcid[0] >> 5 == 1
                    assert decode_server_id(configs, new.dcid) == SID
                    assert await new.echo(b"new") == b"new"
                    assert all(cid[0] >> 5 == 1 for cid in new.wire.server_cids.values())
                # The old connection keeps its config-0 CIDs and still works; new CIDs it gets
                # after a retirement come from config 1.
                assert await old.echo(b"old") == b"old"
                assert old.change_cid()
                assert await old.echo(b"old2") == b"old2"
                assert backend.stats.issued_cids["1"] > 0
                # A CID length change is refused and nothing changes.
                configs.append(CidConfig(config_id=2, server_id_len=2, nonce_len=10, key=bytes(16)))
                before = backend.settings
                assert not backend.reload()
                assert backend.settings is before
                assert backend.stats.reload_failures == 1
                assert await old.echo(b"still") == b"still"
            assert backend.stats.unknown_cid_packets == 0

    arun(scenario())


def test_reload_changes_lb_sources_and_return_mode(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack([SID]) as stack, EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
            backend = stack.backends[0]
            with pytest.raises(ConfigError, match="restart"):
                backend.apply_settings(dataclasses.replace(backend.settings, address=("127.0.0.1", 1)))
            backend.apply_settings(dataclasses.replace(backend.settings, lb_sources=(("127.0.0.5", 0),)))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.5", 0))
                sock.sendto(b"not proxy", backend.address)
            for _ in range(300):  # bounded wait for the datagram
                if backend.stats.encap_rejected:
                    break
                await asyncio.sleep(0.01)
            assert backend.stats.encap_rejected == {"proxy_signature": 1}  # accepted as LB, bad header
            if raw_sockets_allowed():
                backend.apply_settings(dataclasses.replace(backend.settings, return_mode=RETURN_DIRECT))
                relayed = stack.lb.counters["to_client"]
                assert await client.echo(b"direct now") == b"direct now"
                assert stack.lb.counters["to_client"] == relayed
            backend.apply_settings(dataclasses.replace(backend.settings, return_mode=RETURN_VIA_LB))
            relayed = stack.lb.counters["to_client"]
            assert await client.echo(b"via lb again") == b"via lb again"
            assert stack.lb.counters["to_client"] > relayed
            assert backend.stats.reloads >= 2

    arun(scenario())


def test_prometheus_text_parses() -> None:
    stats = BackendStats(datagrams_in=7, unknown_cid_packets=2, connections_open=1)
    stats.reject("source")
    stats.reject("source")
    stats.issued_cids["0"] = 16
    text = render_prometheus(stats, server_id="0001", service='we"ird')
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    base = (("server_id", "0001"), ("service", 'we"ird'))
    assert samples[("unknown_cid_packets_total", base)] == 2
    assert samples[("encap_rejected_total", tuple(sorted((*base, ("reason", "source")))))] == 2
    assert samples[("issued_cids_total", tuple(sorted((*base, ("config", "0")))))] == 16
    assert samples[("connections_open", base)] == 1
    assert samples[("datagrams_in_total", base)] == 7


def test_metrics_server_over_http(arun: Callable[..., Any]) -> None:
    async def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[str, bytes]:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0].decode(), body

    async def scenario() -> None:
        stats = BackendStats(unknown_cid_packets=3)
        server = MetricsServer(lambda: stats, server_id="0001", service="echo")
        await server.start("127.0.0.1", 0)
        assert server.address is not None
        try:
            status, body = await get(server.address, "/metrics")
            assert status == "HTTP/1.1 200 OK"
            assert b'unknown_cid_packets_total{server_id="0001",service="echo"} 3' in body
            status, body = await get(server.address, "/stats")
            assert json.loads(body)["unknown_cid_packets"] == 3
            assert (await get(server.address, "/nope"))[0].startswith("HTTP/1.1 404")
            assert (await get(server.address, "/metrics", "POST"))[0].startswith("HTTP/1.1 405")
        finally:
            server.close()

    arun(scenario())


def test_exhausted_issuer_falls_back_to_unroutable_cids(arun: Callable[..., Any]) -> None:
    """Past ``max_cids`` the issuer never repeats a nonce: it issues 0b111 CIDs (-21 §9.6)."""

    async def scenario() -> None:
        async with loopback_stack([SID], max_cids=3) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata
        ) as client:
            assert await client.echo(b"x") == b"x"  # on the handshake SCID (routable)
            cids = [client.wire.server_cids[seq] for seq in sorted(client.wire.server_cids)]
            assert [cid[0] >> 5 for cid in cids] == [0, 0, 0, 7, 7, 7, 7, 7]
            assert all(decode_server_id(TEST_CID_CONFIG, cid) == SID for cid in cids[:3])
            assert all(decode_server_id(TEST_CID_CONFIG, cid) is None for cid in cids[3:])
            assert len(set(cids)) == len(cids)
            assert stack.backends[0].stats.issued_cids == {"0": 3, "7": 5}

    arun(scenario())
