"""S-1 unlinkability of issued CIDs: an observer can tell neither the backend nor the connection.

CIDs come from the real :class:`~lb.core.cid_issuer.CidIssuer` of two backends
(server IDs 0001 and 0002 under one key), and - for "successive CIDs of one
connection" - from real aioquic server connections with the backends' CID hook
(``install_routable_cids``), handshaking in memory with aioquic clients. Checks
(acceptance S-1), first octet excluded (it carries config bits and length):

* per-byte chi-square against uniform, p > 1e-4, for each backend's CIDs;
* a naive-Bayes guess of the backend, trained on half, scores <= 0.52 on a
  balanced held-out half (10^4 CIDs in CI);
* Hamming distances between successive CIDs of one connection are distributed
  like those of random pairs (two-sample Kolmogorov-Smirnov, p > 0.01);
* no CID repeats.

The issuer's randomness (counter start, permutation key) is seeded here, so
every run sees the same CIDs and the thresholds are fixed-seed, not flaky.
"""

from __future__ import annotations

import itertools
import math
import random
import ssl
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

import lb.core.cid_issuer as cid_issuer
from backends.apps import ECHO_ALPN
from backends.routable_cids import install_routable_cids, peer_cids
from backends.tls import generate_self_signed
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.core.cid_issuer import CidIssuer

KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
CONFIGS = {
    "single-pass": CidConfig(0, 2, 14, KEY),  # the production default: 17-byte CIDs
    "four-pass": CidConfig(1, 2, 6, KEY),  # 9-byte CIDs, Feistel
}
SERVER_IDS = (b"\x00\x01", b"\x00\x02")
#: Upper 1e-4 point of chi-square with 255 degrees of freedom (Wilson-Hilferty: z = 3.719).
CHI2_255_P1E4 = 255 * (1 - 2 / (9 * 255) + 3.719 * math.sqrt(2 / (9 * 255))) ** 3
CONNECTIONS_PER_BACKEND = 40


class SeededSecrets:
    """Stands in for the ``secrets`` module inside the issuer: same calls, reproducible values."""

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def token_bytes(self, n: int) -> bytes:
        return self._rng.randbytes(n)


@pytest.fixture(autouse=True)
def seeded_issuers(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    monkeypatch.setattr(cid_issuer, "secrets", SeededSecrets(request.node.nodeid))
    yield


def issued(cfg: CidConfig, per_backend: int) -> dict[bytes, list[bytes]]:
    out = {}
    for sid in SERVER_IDS:
        issuer = CidIssuer(cfg, sid)
        out[sid] = [issuer.next_cid() for _ in range(per_backend)]
    return out


def chi_square_uniform(values: Sequence[int]) -> float:
    counts = Counter(values)
    expected = len(values) / 256
    return sum((counts.get(v, 0) - expected) ** 2 / expected for v in range(256))


def naive_bayes_accuracy(train: dict[bytes, list[bytes]], test: dict[bytes, list[bytes]]) -> float:
    """Per-position byte likelihoods (Laplace-smoothed) per backend; accuracy of the argmax on ``test``."""
    log_tables: dict[bytes, list[list[float]]] = {}
    for sid, cids in train.items():
        width = len(cids[0])
        counts = [[1] * 256 for _ in range(width)]
        for cid in cids:
            for pos in range(1, width):
                counts[pos][cid[pos]] += 1
        log_tables[sid] = [[math.log(c / (len(cids) + 256)) for c in row] for row in counts]
    right = total = 0
    for true_sid, cids in test.items():
        for cid in cids:
            scores = {sid: sum(t[pos][cid[pos]] for pos in range(1, len(cid))) for sid, t in log_tables.items()}
            right += max(scores, key=lambda s: scores[s]) == true_sid
            total += 1
    return right / total


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a[1:], "big") ^ int.from_bytes(b[1:], "big")).bit_count()


def ks_two_sample_p(xs: Sequence[int], ys: Sequence[int]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (asymptotic; conservative for discrete data)."""
    points = sorted(set(xs) | set(ys))
    sx, sy = sorted(xs), sorted(ys)
    d, i, j = 0.0, 0, 0
    for p in points:
        while i < len(sx) and sx[i] <= p:
            i += 1
        while j < len(sy) and sy[j] <= p:
            j += 1
        d = max(d, abs(i / len(sx) - j / len(sy)))
    ne = len(xs) * len(ys) / (len(xs) + len(ys))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.2:
        return 1.0
    return max(0.0, min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def check_issuer_cids(cfg: CidConfig, per_backend: int) -> None:
    cids = issued(cfg, per_backend)
    every = [c for group in cids.values() for c in group]
    assert len(set(every)) == len(every)  # no repeats, within or across backends
    for sid, group in cids.items():
        assert all(decode_server_id(cfg, c) == sid for c in group[:100])  # they are real, routable CIDs
        for pos in range(1, cfg.cid_len):
            stat = chi_square_uniform([c[pos] for c in group])
            assert stat < CHI2_255_P1E4, (sid.hex(), pos, stat)
    half = per_backend // 2
    accuracy = naive_bayes_accuracy({s: g[:half] for s, g in cids.items()}, {s: g[half:] for s, g in cids.items()})
    assert accuracy <= 0.52, accuracy


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_s1_issued_cids_reveal_neither_backend_nor_byte_pattern(mode: str) -> None:
    check_issuer_cids(CONFIGS[mode], per_backend=10_000)


@pytest.mark.optin
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_s1_issued_cids_opt_in_size(mode: str) -> None:
    check_issuer_cids(CONFIGS[mode], per_backend=100_000)


# --- successive CIDs of one connection, from real aioquic servers with the backends' hook -------------

IDENTITY = generate_self_signed()


def connection_cids(issuer: CidIssuer) -> list[bytes]:
    """Handshake an aioquic client with a hooked aioquic server in memory; the server CIDs the client holds."""
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN], verify_mode=ssl.CERT_NONE)
    )
    client.connect(("127.0.0.1", 4433), now=0.0)
    config = QuicConfiguration(is_client=False, alpn_protocols=[ECHO_ALPN], connection_id_length=issuer.cid_len)
    IDENTITY.apply(config)
    odcid = client.original_destination_connection_id
    server = QuicConnection(configuration=config, original_destination_connection_id=odcid)
    install_routable_cids(server, issuer.next_cid)
    now = 0.0
    for _ in range(20):  # bounded rounds; a handshake takes three or four
        moved = False
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 40000), now=now)
            moved = True
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            moved = True
        now += 0.001
        if not moved:
            break
    return [cid for _, cid in sorted(peer_cids(client))]


def test_s1_successive_cids_of_a_connection_look_like_random_pairs() -> None:
    cfg = CONFIGS["single-pass"]
    connections: list[list[bytes]] = []
    for sid in SERVER_IDS:
        issuer = CidIssuer(cfg, sid)  # one per backend, shared by its connections, as in backends/server.py
        for _ in range(CONNECTIONS_PER_BACKEND):
            cids = connection_cids(issuer)
            assert len(cids) >= 4 and all(decode_server_id(cfg, c) == sid for c in cids)
            connections.append(cids)
    every = [c for cids in connections for c in cids]
    assert len(set(every)) == len(every)
    within = [hamming(a, b) for cids in connections for a, b in itertools.pairwise(cids)]
    rng = random.Random(1)
    across = [hamming(*rng.sample(every, 2)) for _ in range(4 * len(within))]
    p = ks_two_sample_p(within, across)
    assert p > 0.01, (p, sum(within) / len(within), sum(across) / len(across))
