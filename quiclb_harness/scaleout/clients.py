"""Real QUIC clients in the client namespace: aioquic (echo and HTTP/3) and ngtcp2's ``gtlsclient``.

The coroutines here run on a :class:`~quiclb_harness.scaleout.netns.NamespaceLoop`
in the client namespace, so every client socket is bound to the client's
address there and its datagrams cross the router's ECMP.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lb.control.config import load_config
from lb.control.table_builder import TableBuilder
from lb.core.router import Router
from quiclb_harness.datagrams import initial
from quiclb_harness.scaleout.netns import Netns
from quiclb_harness.scaleout.topology import CLIENT_ADDR, VIP, VIP_PORT

if TYPE_CHECKING:
    from backends.client import EchoClient

HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Handshake:
    local: tuple[str, int]  # the client's address and port: the 4-tuple the fallback hashes
    served_by: str  # server ID the backend's CIDs decode to
    attempts: int  # 1, or 2 when the first handshake failed and a new connection was opened


async def open_client(cadata: bytes, *, alpn: str | None = None, timeout: float = HANDSHAKE_TIMEOUT) -> EchoClient:
    from backends.client import EchoClient  # noqa: PLC0415 - aioquic only where clients run

    if alpn is None:
        return await EchoClient.open(VIP, VIP_PORT, cadata=cadata, local_host=CLIENT_ADDR, timeout=timeout)
    return await EchoClient.open(VIP, VIP_PORT, cadata=cadata, local_host=CLIENT_ADDR, timeout=timeout, alpn=alpn)


async def open_many(n: int, cadata: bytes, *, concurrency: int = 16, alpn: str | None = None,
                    retries: int = 1) -> list[tuple[EchoClient, int]]:
    """``n`` handshakes, ``concurrency`` at a time; a failed one is retried (a new connection) ``retries`` times.

    Returns (client, attempts) pairs; raises if one still fails after its retries.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one() -> tuple[EchoClient, int]:
        async with sem:
            for attempt in range(1, retries + 2):
                try:
                    return await open_client(cadata, alpn=alpn), attempt
                except Exception:
                    if attempt > retries:
                        raise
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def download(client: EchoClient, size: int, timeout: float) -> bool:
    response = await client.request("GET", f"/bytes/{size}", timeout=timeout)
    return response.status == 200 and len(response.body) == size


class FallbackOracle:
    """The keyed Maglev of the configuration, computed here: where must each client Initial land?

    Every LB builds the same table from the same file; if one did not, handshakes that
    reach it would land elsewhere than this prediction.
    """

    def __init__(self, config: Path) -> None:
        cfg = load_config(config)
        self.service = cfg.services[0]
        self.router = Router(TableBuilder().build(cfg, lambda _s, _b: True)[self.service.name])
        self.decoders = list(self.service.cid_configs)

    def predicted(self, local: tuple[str, int]) -> str:
        _outcome, backend = self.router.route(initial(1, bytes(8), bytes(8)), local)
        return backend.server_id.hex() if backend is not None else "none"

    def owner(self, cid: bytes) -> str:
        from lb.core.cid_decoder import decode_cid  # noqa: PLC0415

        decoded = decode_cid(self.decoders, cid)
        return decoded[0].hex() if decoded is not None else "unroutable"

    def handshake(self, client: EchoClient, attempts: int) -> Handshake:
        return Handshake(client.local_address, self.owner(client.dcid), attempts)


def ngtcp2_get(client_ns: Netns, download_dir: Path, size: int, timeout: float = 30.0) -> tuple[bool, str, float]:
    """One HTTP/3 GET of ``size`` bytes with ngtcp2's client from the client namespace: (ok, served by, seconds)."""
    download_dir.mkdir(parents=True, exist_ok=True)
    argv = client_ns.exec_argv(["gtlsclient", "--exit-on-all-streams-close", "--timeout=5s", "-q",
                                f"--download={download_dir}", VIP, str(VIP_PORT),
                                f"https://localhost:{VIP_PORT}/", f"https://localhost:{VIP_PORT}/bytes/{size}"])
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    took = time.monotonic() - t0
    page = download_dir / "index.html"
    body = download_dir / str(size)
    text = page.read_text() if page.exists() else ""
    served = text.split("server_id=", 1)[1][:4] if "server_id=" in text else "?"
    ok = out.returncode == 0 and body.exists() and body.stat().st_size == size
    return ok, served, took
