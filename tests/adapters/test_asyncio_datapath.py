"""AsyncioDatapath over real loopback sockets, on asyncio and uvloop: sends the kernel refuses are counted.

Both loops report a failed ``sendto`` to ``error_received`` instead of raising
(issue 12 item 8), and asyncio closes the whole transport on a family
mismatch. A forward whose PROXY header pushes it over the UDP limit, or one to
a backend of the other address family, must count as ``backend_unreachable``
— never as ``tx_to_backend`` — and must leave the inside socket working.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from lb import CidConfig, encode_cid
from lb.adapters.asyncio_datapath import AsyncioDatapath, socket_opener
from lb.core.return_path import ReturnPath
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import short_header
from quiclb_harness.deployment import free_udp_port

KEY = bytes(range(16))
CFG = CidConfig(0, 2, 14, KEY)


def run_on(loop_name: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_refused_forwards_count_as_unreachable_and_the_inside_socket_survives(loop_name: str) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)
    good = Backend(b"\x00\x01", ("127.0.0.1", sink.getsockname()[1]))
    broadcast = Backend(b"\x00\x02", ("255.255.255.255", 9))  # EACCES without SO_BROADCAST
    wrong_family = Backend(b"\x00\x03", ("::1", 9))
    vip = ("127.0.0.1", free_udp_port())
    table = build_service_table(name="echo", vip=vip, cid_configs=[CFG], backends=[good, broadcast, wrong_family],
                                fallback_key=b"k")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    refused = ["0001", "0002", "0003"]

    async def main() -> None:
        datapath = AsyncioDatapath(socket_opener())
        await datapath.open_inside(("127.0.0.1", free_udp_port()), ReturnPath([table]))
        await datapath.open_vip("echo", vip, Router(table))
        try:
            to_good = short_header(encode_cid(CFG, b"\x00\x01", os.urandom(14)))
            # 65507 bytes is the largest IPv4 UDP payload: with the PROXY header it cannot be sent.
            client.sendto(to_good + bytes(65507 - len(to_good)), vip)
            for sid in refused[1:]:
                client.sendto(short_header(encode_cid(CFG, bytes.fromhex(sid), os.urandom(14))), vip)
            client.sendto(to_good, vip)  # after the failures the inside socket still forwards
            await wait_for(lambda: datapath.stats().rx_client_datagrams == len(refused) + 1)
            stats = datapath.stats()
            assert stats.backend_unreachable == {("echo", sid): 1 for sid in refused}
            assert stats.tx_to_backend == {("echo", "0001"): 1}
            data = await asyncio.get_running_loop().run_in_executor(None, sink.recv, 65535)
            assert data.endswith(to_good)
        finally:
            datapath.close()

    try:
        run_on(loop_name, main)
    finally:
        sink.close()
        client.close()
