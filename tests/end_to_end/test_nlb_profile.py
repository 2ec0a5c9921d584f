"""quiclb-backend started with only AWS_LBC_QUIC_SERVER_ID serves traffic through quiclb in the NLB profile.

Real processes on loopback: one ``quiclb run`` and two ``quiclb-backend``
processes that get their server IDs from the environment alone (one in the
controller's base64 form, one in the NLB API's ``0x`` form), configured with
the AWS NLB CID profile (plaintext, 8-byte server IDs, 16-byte CIDs starting
0x0F). HTTP/3 clients through the VIP must reach the backend their CID names.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections import Counter
from pathlib import Path

from backends.client import EchoClient
from backends.settings import AWS_SERVER_ID_ENV
from quiclb_harness.deployment import CidConfigSpec
from quiclb_harness.processes import ManagedProcess
from quiclb_harness.quic_cluster import QuicCluster

SERVER_IDS = ["00000000000000a1", "00000000000000a2"]
NLB_PROFILE = CidConfigSpec(config_id=0, server_id_len=8, nonce_len=7, plaintext=True, self_encode_length=True)
CONNECTIONS = 12
SERVER_ID_HEADER = "x-quiclb-server-id"


def start_backend_from_environment(config: Path, value: str) -> ManagedProcess:
    """``quiclb-backend -c CONFIG`` with no ``--server-id``: the ID comes from the environment."""
    process = ManagedProcess([sys.executable, "-m", "backends", "-c", str(config)],
                             env={AWS_SERVER_ID_ENV: value}, name="quiclb-backend")
    process.wait_ready()
    return process


async def connect_and_ask(host: str, port: int, cadata: bytes) -> list[tuple[str, bytes]]:
    """(server ID that answered, the CID the client sends to) for each connection."""
    answers = []
    for _ in range(CONNECTIONS):
        async with EchoClient.connect(host, port, cadata=cadata, alpn="h3") as client:
            response = await client.request("GET", "/")
            assert response.status == 200
            answers.append((response.headers[SERVER_ID_HEADER], client.wire.server_cids[0]))
    return answers


def test_backends_with_only_the_environment_server_id_serve_through_quiclb(tmp_path: Path) -> None:
    cluster = QuicCluster(tmp_path, server_ids=list(SERVER_IDS), cid=NLB_PROFILE)
    backends: list[ManagedProcess] = []
    try:
        ids = [bytes.fromhex(sid) for sid in SERVER_IDS]
        forms = [base64.b64encode(ids[0]).decode(), "0x" + ids[1].hex()]  # the controller's, the NLB API's
        for value in forms:
            backends.append(start_backend_from_environment(cluster.dep.path, value))
        ready = {p.wait_ready()["server_id"] for p in backends}
        assert ready == set(SERVER_IDS)
        cluster.start_lb()

        answers = asyncio.run(connect_and_ask(*cluster.dep.vip(), cluster.cert_pem))
        for served_by, cid in answers:
            assert len(cid) == 16 and cid[0] == 0x0F, cid.hex()
            assert cid[1:9].hex() == served_by  # the CID names the backend that answered
        # Handshakes are spread by the fallback hash, so both backends serve some of them.
        assert set(Counter(s for s, _ in answers)) == set(SERVER_IDS)
    finally:
        for process in backends:
            process.stop(timeout=5)
        cluster.close()
