"""Interop: an independent QUIC stack (ngtcp2's example client, Debian package ngtcp2-client,
installed by ``make install``) through the real LB to the aioquic backends.

The client shares no code with this project: its Initial DCIDs, CID
handling, migration and version negotiation are its own.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb import CidConfig, decode_server_id
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.quic_cluster import QuicCluster

CLIENT = "gtlsclient"
RUN_TIMEOUT = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicCluster]:
    if shutil.which(CLIENT) is None:
        pytest.fail(f"{CLIENT} is missing: `make install` installs the Debian package ngtcp2-client")
    c = QuicCluster(tmp_path_factory.mktemp("ngtcp2"))
    try:
        c.start()
        yield c
    finally:
        c.close()


def run_client(cluster: QuicCluster, download: Path, *options: str, paths: tuple[str, ...] = ("/",)) -> str:
    host, port = cluster.dep.vip()
    argv = [CLIENT, "--exit-on-all-streams-close", "--timeout=5s", f"--download={download}", *options,
            host, str(port), *(f"https://localhost:{port}{p}" for p in paths)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr  # ngtcp2 logs its QUIC events on stderr


def served_by(download: Path) -> str:
    page = (download / "index.html").read_text()
    return page.split("server_id=", 1)[1][:4]


def server_cids(log: str) -> set[bytes]:
    """CIDs the server gave the client: the DCIDs of the client's 1-RTT packets."""
    out = set()
    for line in log.splitlines():
        if " pkt tx " in line and "type=1RTT" in line:
            out.add(bytes.fromhex(line.split("dcid=0x", 1)[1].split()[0]))
    return out


def test_http3_get_and_a_transfer(cluster: QuicCluster, tmp_path: Path) -> None:
    log = run_client(cluster, tmp_path, paths=("/", "/bytes/300000"))
    assert (tmp_path / "300000").stat().st_size == 300_000
    sid = served_by(tmp_path)
    cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
    cids = server_cids(log)
    assert cids and {decode_server_id(cfg, c) for c in cids} == {bytes.fromhex(sid)}


@pytest.mark.parametrize("rebinding", [True, False], ids=["nat-rebinding", "migration"])
def test_address_change_mid_connection(cluster: QuicCluster, tmp_path: Path, rebinding: bool) -> None:
    """ngtcp2 changes its local address after the handshake (NAT rebinding: same CID; migration:
    new CID) while requests are still pending; all of them complete on the same backend."""
    options = ["--change-local-addr=100ms", "--delay-stream=300ms", "-n", "3"]
    if rebinding:
        options.append("--nat-rebinding")
    log = run_client(cluster, tmp_path, *options)
    assert "PATH_CHALLENGE" in log  # the server validated the new address
    sid = bytes.fromhex(served_by(tmp_path))
    cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
    assert {decode_server_id(cfg, c) for c in server_cids(log)} == {sid}
    assert all(b.stats()["unknown_cid_packets"] == 0 for b in cluster.backends.values())


def test_version_negotiation_through_the_lb(cluster: QuicCluster, tmp_path: Path) -> None:
    """The client starts with a version nobody speaks: the LB sends the full-size Initial to one
    backend by the fallback, which answers with Version Negotiation; the client retries in v1."""
    before = metric_sum(cluster.lb_metrics(), "quiclb_fallback_routed_total", reason="unknown_version")
    log = run_client(cluster, tmp_path, "-v", "0x1a2a3a4a", "--preferred-versions=0x1")
    assert "server_id=" in (tmp_path / "index.html").read_text()
    assert "type=VN" in log and "Client selected version 0x1" in log
    assert "the negotiated version is 0x00000001" in log
    after = metric_sum(cluster.lb_metrics(), "quiclb_fallback_routed_total", reason="unknown_version")
    assert after > before
