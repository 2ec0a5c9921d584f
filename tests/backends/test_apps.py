"""Applications by ALPN: HTTP/0.9 (hq-interop, spoken by interop-runner clients) and h3 /bytes/N."""

from __future__ import annotations

import asyncio

from backends.client import EchoClient
from quiclb_harness.loopback_stack import loopback_stack


def test_hq_interop_get_returns_the_page_and_sized_bodies() -> None:
    async def scenario() -> None:
        async with loopback_stack((b"\x00\x07",)) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata, alpn="hq-interop"
        ) as client:
            assert client.alpn == "hq-interop"
            page = await client.echo(b"GET /\r\n")
            assert b"server_id=0007" in page
            assert await client.echo(b"GET /bytes/100000\r\n") == bytes(100_000)
            assert await client.echo(b"GET /nothing-here\r\n") == b""

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_h3_bytes_endpoint_serves_n_bytes() -> None:
    async def scenario() -> None:
        async with loopback_stack((b"\x00\x07",)) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata, alpn="h3"
        ) as client:
            response = await client.request("GET", "/bytes/250000")
            assert response.status == 200 and response.body == bytes(250_000)
            assert (await client.request("GET", "/bytes/99999999999")).status == 404

    asyncio.run(asyncio.wait_for(scenario(), 30))
