"""Traffic files for the generator: routable short headers, 1M-CID tables, the Initial/garbage mix.

Two formats (read by bench/c/udp_blast.c):

* heads: a 2-byte big-endian head length H, then heads of H bytes: the short
  header's first octet and the DCID. The generator pads each to the datagram
  size with shared filler, so a million distinct DCIDs cost H MB, not 1.2 GB.
* datagrams: each datagram as a 2-byte big-endian length and its bytes (mixed
  sizes: the mix scenario, and the pinger's one datagram).

CIDs are encoded in batches with one AES-ECB call per pass over all of them
(the ``cryptography`` context takes a whole buffer): single pass is one call,
four pass four. Nonces are a counter XOR a random mask, so every CID is
distinct by construction (random 4-byte nonces would collide ~100 times in
1M). A sample of every table is checked with ``lb.decode_server_id``, the
public API, so the benchmark can never silently send unroutable traffic.
Tables are cached in bench/c/build/traffic/ keyed by every parameter.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from lb import CidConfig, decode_server_id

CACHE = Path(__file__).resolve().parents[1] / "c" / "build" / "traffic"
SHORT_HEADER_BITS = 0x40  # fixed bit set, short header (RFC 9000 §17.3)
UNROUTABLE_CONFIG_BITS = 0b111 << 5  # config ID 7: unroutable by definition (-21 §3.2)
MIX_PERIOD = 100  # per 100 datagrams: 94 routable, 5 Initials, 1 garbage
MIX_INITIALS = 5
MIX_GARBAGE = 1
INITIAL_SIZE = 1200  # a client Initial is padded to 1200 bytes (RFC 9000 §14.1)


def server_ids(cfg: CidConfig, count: int = 3) -> list[bytes]:
    """Server IDs 1..count in ``server_id_len`` bytes (as hex in the LB config)."""
    return [i.to_bytes(cfg.server_id_len, "big") for i in range(1, count + 1)]


def _blocks(cfg: CidConfig, count: int, seed: int) -> bytes:
    """``server_id || nonce`` for CIDs 0..count-1: backends in turn, nonce = counter XOR mask."""
    rng = random.Random(seed)
    n = cfg.nonce_len
    mask = int.from_bytes(rng.randbytes(n), "big")
    sids = server_ids(cfg)
    return b"".join(sids[i % len(sids)] + ((i // len(sids)) ^ mask).to_bytes(n, "big") for i in range(count))


def _feistel_batch(update: Callable[[bytes], bytes], cfg: CidConfig, blocks: bytes, count: int) -> bytes:
    """Four-pass encryption (-21 §5.4.2) of ``count`` blocks, one AES call per pass for all of them."""
    n = cfg.block_len
    h = (n + 1) // 2
    odd = n % 2 == 1
    full = (1 << (8 * h)) - 1
    lm = full & ~0x0F if odd else full
    rm = full >> 4 if odd else full
    left = [int.from_bytes(blocks[i * n : i * n + h], "big") & lm for i in range(count)]
    right = [int.from_bytes(blocks[i * n + n - h : (i + 1) * n], "big") & rm for i in range(count)]

    def f(pass_no: int, halves: list[int]) -> list[int]:
        suffix = bytes(14 - h) + bytes((n, pass_no))
        # One ECB call for every CID's pass input: 16 bytes in, 16 out, any number of blocks.
        out = update(b"".join(x.to_bytes(h, "big") + suffix for x in halves))
        return [int.from_bytes(out[16 * i : 16 * i + h], "big") for i in range(count)]

    right = [(r ^ v) & rm for r, v in zip(right, f(1, left), strict=True)]
    left = [(x ^ v) & lm for x, v in zip(left, f(2, right), strict=True)]
    right = [(r ^ v) & rm for r, v in zip(right, f(3, left), strict=True)]
    left = [(x ^ v) & lm for x, v in zip(left, f(4, right), strict=True)]
    out = []
    for x, r in zip(left, right, strict=True):
        lb, rb = x.to_bytes(h, "big"), r.to_bytes(h, "big")
        out.append(lb[:-1] + bytes((lb[-1] | rb[0],)) + rb[1:] if odd else lb + rb)
    return b"".join(out)


def encode_cids(cfg: CidConfig, count: int, seed: int) -> list[bytes]:
    """``count`` distinct routable CIDs of ``cfg`` (single pass or four pass; self-encoded length)."""
    assert cfg.key is not None and cfg.self_encode_length
    blocks = _blocks(cfg, count, seed)
    update = Cipher(algorithms.AES(cfg.key), modes.ECB()).encryptor().update  # ECB: QUIC-LB's construction
    n = cfg.block_len
    body = update(blocks) if n == 16 else _feistel_batch(update, cfg, blocks, count)
    first = bytes(((cfg.config_id << 5) | (cfg.cid_len - 1),))
    cids = [first + body[i * n : (i + 1) * n] for i in range(count)]
    sids = server_ids(cfg)
    for i in range(0, count, max(1, count // 61)):  # a spread sample decodes to the backend it was made for
        if decode_server_id(cfg, cids[i]) != sids[i % len(sids)]:
            raise AssertionError(f"CID {i} does not decode to its server ID: the batch encoder is wrong")
    return cids


def _cached(name: str, key: Sequence[object], build: Callable[[], bytes]) -> Path:
    digest = hashlib.sha256(repr(tuple(key)).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{digest}.bin"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(build())
        tmp.replace(path)
    return path


def heads_file(cfg: CidConfig, count: int, seed: int) -> Path:
    """A heads table of ``count`` distinct routable short headers (first octet + DCID)."""

    def build() -> bytes:
        rng = random.Random(seed ^ 0x5EED)
        cids = encode_cids(cfg, count, seed)
        low = rng.randbytes(count)
        head_len = 1 + cfg.cid_len
        return struct.pack("!H", head_len) + b"".join(
            bytes((SHORT_HEADER_BITS | (low[i] & 0x3F),)) + c for i, c in enumerate(cids)
        )

    assert cfg.key is not None
    return _cached("heads", ("heads", cfg.config_id, cfg.server_id_len, cfg.nonce_len, cfg.key, count, seed), build)


def _initial(rng: random.Random) -> bytes:
    """A client Initial (RFC 9000 §17.2.2): random 8-byte DCID, empty token, padded to 1200 bytes."""
    dcid, scid = rng.randbytes(8), rng.randbytes(8)
    head = bytes((0xC0 | rng.randrange(4),)) + struct.pack("!I", 1) + bytes((8,)) + dcid + bytes((8,)) + scid
    head += b"\x00"  # token length 0
    rest = INITIAL_SIZE - len(head) - 2
    return head + struct.pack("!H", 0x4000 | rest) + rng.randbytes(rest)


def mix_file(cfg: CidConfig, size: int, periods: int, seed: int) -> Path:
    """Datagrams in periods of 100: 94 routable (``size`` B), 5 Initials (1200 B, fallback), 1 garbage.

    Garbage is a short header whose DCID names config 7 (unroutable by definition): quiclb drops it,
    a plain forwarder forwards it. Its position is fixed (the last of every period), so the number of
    garbage datagrams in any run of the generator is known exactly (``mix_garbage``).
    """

    def build() -> bytes:
        rng = random.Random(seed)
        cids = encode_cids(cfg, periods * MIX_PERIOD, seed)
        out = []
        for p in range(periods):
            for j in range(MIX_PERIOD):
                if j >= MIX_PERIOD - MIX_GARBAGE:
                    head = bytes((SHORT_HEADER_BITS, UNROUTABLE_CONFIG_BITS | (cfg.cid_len - 1)))
                    d = head + rng.randbytes(size - len(head))
                elif j >= MIX_PERIOD - MIX_GARBAGE - MIX_INITIALS:
                    d = _initial(rng)
                else:
                    head = bytes((SHORT_HEADER_BITS | rng.randrange(64),)) + cids[p * MIX_PERIOD + j]
                    d = head + rng.randbytes(size - len(head))
                out.append(struct.pack("!H", len(d)) + d)
        return b"".join(out)

    assert cfg.key is not None
    return _cached("mix", ("mix", cfg.server_id_len, cfg.nonce_len, cfg.key, size, periods, seed), build)


def mix_garbage(start: int, sent: int) -> int:
    """Garbage datagrams among generator indices [start, start + sent) of a mix file."""
    return (start + sent) // MIX_PERIOD - start // MIX_PERIOD


def ping_file(cfg: CidConfig, size: int, seed: int, directory: Path) -> Path:
    """One routable datagram of ``size`` bytes, for udp_ping (which writes its sequence number at the end)."""
    rng = random.Random(seed)
    cid = encode_cids(cfg, 1, seed)[0]
    d = bytes((SHORT_HEADER_BITS,)) + cid
    d += rng.randbytes(size - len(d))
    path = directory / f"ping-{size}.bin"
    path.write_bytes(struct.pack("!H", len(d)) + d)
    return path
