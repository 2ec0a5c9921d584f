"""Load-balancer side of the QUIC-LB codec: connection ID -> server ID (-21 §5.5, §6.2).

A DCID is unroutable, and these functions return ``None``, when it is empty,
its config bits are 0b111 or name no configuration given, or it is shorter
than ``1 + server_id_len + nonce_len`` (-21 §4.1). Bytes after the block are
ignored (trap T12). There is no integrity check in any mode (trap T18): a
random DCID with a known config ID decodes to *some* server ID, and only the
caller's server table can tell it apart.

Two entry points:

* :func:`decode_server_id` / :func:`decode_cid` — simple scalar calls, the
  public API (contract).
* :class:`CidDecoder` — the datapath: per-configuration decoders selected by
  the config bits, a scalar ``decode`` and a batch ``decode_many`` that makes
  one AES call per pass for a whole batch of CIDs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from operator import itemgetter

from lb.core.cid_cipher import AES_BLOCK_LEN, FeistelParams, aes_ecb, feistel_cid_decryptor, feistel_params
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig, CidMode
from lb.core.strided_unpack import StridedUnpack, strided_unpack

#: Batches up to this size get a cached struct that cuts every server ID out of the AES output
#: in one call; larger ones (never from the datapath, whose batches hold 64) are cut one by one.
MAX_STRUCT_BATCH = 256

ConfigSet = CidConfig | Sequence[CidConfig] | Mapping[int, CidConfig]


def _select(configs: ConfigSet, cid: bytes) -> CidConfig | None:
    """The configuration named by the CID's config bits, if it is given and long enough."""
    if not cid:
        return None
    config_id = cid[0] >> 5
    if config_id == UNROUTABLE_CONFIG_ID:
        return None
    cfg: CidConfig | None
    if isinstance(configs, CidConfig):
        cfg = configs if configs.config_id == config_id else None
    elif isinstance(configs, Mapping):
        cfg = configs.get(config_id)
    else:
        cfg = next((c for c in configs if c.config_id == config_id), None)
    if cfg is None or len(cid) < cfg.cid_len:
        return None
    return cfg


def decode_cid(configs: ConfigSet, cid: bytes) -> tuple[bytes, bytes] | None:
    """Full decode: ``(server_id, nonce)``, or ``None`` when the CID is unroutable."""
    cid = bytes(cid)
    cfg = _select(configs, cid)
    if cfg is None:
        return None
    sid_len, n = cfg.server_id_len, cfg.block_len
    block = cid[1 : 1 + n]
    mode = cfg.mode
    if mode is CidMode.PLAINTEXT:
        plain = block
    elif mode is CidMode.SINGLE_PASS:
        assert cfg.key is not None
        plain = aes_ecb(cfg.key).decrypt(block)
    else:
        assert cfg.key is not None
        plain = feistel_cid_decryptor(aes_ecb(cfg.key).encrypt, feistel_params(n), n)(cid)
    return plain[:sid_len], plain[sid_len:]


def decode_server_id(configs: ConfigSet, cid: bytes) -> bytes | None:
    """The server ID in ``cid``, or ``None`` when it is unroutable.

    ``configs`` is one :class:`CidConfig`, a sequence of them, or a mapping
    from config ID to configuration; the CID's config bits pick the one used.
    Four-pass CIDs take three AES calls when ``nonce_len >= server_id_len``.
    """
    cid = bytes(cid)
    cfg = _select(configs, cid)
    if cfg is None:
        return None
    return _config_decoder(cfg).decode(cid)


@lru_cache(maxsize=256)
def _config_decoder(cfg: CidConfig) -> ConfigDecoder:
    return ConfigDecoder(cfg)


class ConfigDecoder:
    """Server-ID extraction for one configuration, specialised by mode.

    ``decode`` assumes the caller already checked the config bits and the
    length (as :class:`CidDecoder` does); ``decode_many`` checks length itself.
    """

    __slots__ = ("_sid_unpacks", "cfg", "cid_len", "decode", "mode", "sid_len")

    def __init__(self, cfg: CidConfig) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.sid_len = cfg.server_id_len
        self.cid_len = cfg.cid_len
        self.decode: Callable[[bytes], bytes] = self._build_scalar()
        self._sid_unpacks: dict[int, StridedUnpack] = {}  # batch size -> server IDs out of the AES output

    def _build_scalar(self) -> Callable[[bytes], bytes]:
        cfg, sid_len, n = self.cfg, self.sid_len, self.cfg.block_len
        end = 1 + sid_len
        if self.mode is CidMode.PLAINTEXT:
            return lambda cid: cid[1:end]
        assert cfg.key is not None
        aes = aes_ecb(cfg.key)
        if self.mode is CidMode.SINGLE_PASS:
            decrypt = aes.decrypt
            return lambda cid: decrypt(cid[1:17])[:sid_len]
        return feistel_cid_decryptor(aes.encrypt, feistel_params(n), sid_len)

    def decode_many(self, cids: Sequence[bytes]) -> list[bytes | None]:
        """Decode a batch with one AES call per pass; ``None`` for CIDs that are too short.

        Results equal ``decode`` on every input; the config bits are not checked here.
        """
        if cids and min(map(len, cids)) >= self.cid_len:
            return self._decode_all(cids)  # type: ignore[return-value]  # list[bytes] is a list[bytes | None]
        out: list[bytes | None] = [None] * len(cids)
        idx = [i for i, c in enumerate(cids) if len(c) >= self.cid_len]
        if not idx:
            return out
        sid_len, n = self.sid_len, self.cfg.block_len
        if self.mode is CidMode.PLAINTEXT:
            for i in idx:
                out[i] = bytes(cids[i][1 : 1 + sid_len])
            return out
        assert self.cfg.key is not None
        aes = aes_ecb(self.cfg.key)
        if self.mode is CidMode.SINGLE_PASS:
            plain = aes.decrypt(b"".join(cids[i][1:17] for i in idx))
            for k, i in enumerate(idx):
                base = k * AES_BLOCK_LEN
                out[i] = plain[base : base + sid_len]
            return out
        return _feistel_decode_many(aes.encrypt, feistel_params(n), sid_len, cids, idx=idx, out=out)

    def _decode_all(self, cids: Sequence[bytes]) -> list[bytes]:
        """``decode_many`` when every CID is long enough (the datapath's batches): C-level calls only.

        A cold cache (1M DCIDs) sends every datagram through here, so the per-CID slicing
        of the general path is replaced by ``map`` over one slice and one struct call.
        """
        count, sid_len = len(cids), self.sid_len
        if self.mode is CidMode.PLAINTEXT:
            return list(map(itemgetter(slice(1, 1 + sid_len)), map(bytes, cids)))
        assert self.cfg.key is not None
        aes = aes_ecb(self.cfg.key)
        if self.mode is CidMode.SINGLE_PASS:
            plain = aes.decrypt(b"".join(map(itemgetter(_BLOCK), cids)))
            if count > MAX_STRUCT_BATCH:
                return [plain[k : k + sid_len] for k in range(0, count * AES_BLOCK_LEN, AES_BLOCK_LEN)]
            unpack = self._sid_unpacks.get(count)
            if unpack is None:
                unpack = self._sid_unpacks[count] = strided_unpack(0, sid_len, count, AES_BLOCK_LEN)
            return list(unpack(plain))
        out: list[bytes | None] = [None] * count
        _feistel_decode_many(aes.encrypt, feistel_params(self.cfg.block_len), sid_len, cids,
                             idx=list(range(count)), out=out)
        return out  # type: ignore[return-value]  # every entry filled: all CIDs are long enough


#: The AES block of a single-pass CID: the octets after the first.
_BLOCK = slice(1, 1 + AES_BLOCK_LEN)


def _feistel_decode_many(
    encrypt: Callable[[bytes], bytes],
    params: FeistelParams,
    sid_len: int,
    cids: Sequence[bytes],
    *,
    idx: list[int],
    out: list[bytes | None],
) -> list[bytes | None]:
    """Four-pass decryption of a whole batch as a handful of big-integer operations.

    Each half lives in the first ``half_len`` bytes of a 16-byte slot whose
    remaining bytes are already the ``expand()`` suffix (zeros, n, pass). The
    concatenated slots are the AES input of a pass as they are; XOR-ing the
    masked AES output into the other half's slots (one big-int XOR for the
    whole batch) leaves their suffix bytes intact, and changing the pass byte
    is one more XOR. Per CID, Python only slices bytes at the start and the end.
    """
    n, h = params.n, params.half_len
    count = len(idx)
    pad = bytes(AES_BLOCK_LEN - h - 2)
    width = count * AES_BLOCK_LEN

    def repeat(slot: bytes) -> int:
        return int.from_bytes(slot * count, "big")

    # Masks over whole slots: nibble clearing inside the half, all-ones elsewhere
    # (keeps the suffix), and "half only" for the AES outputs (truncate, T6).
    keep_left = repeat(params.left_mask.to_bytes(h, "big") + b"\xff" * (AES_BLOCK_LEN - h))
    keep_right = repeat(params.right_mask.to_bytes(h, "big") + b"\xff" * (AES_BLOCK_LEN - h))
    out_left = repeat(params.left_mask.to_bytes(h, "big") + bytes(AES_BLOCK_LEN - h))
    out_right = repeat(params.right_mask.to_bytes(h, "big") + bytes(AES_BLOCK_LEN - h))

    def pass_byte(a: int, b: int) -> int:  # XOR that turns pass byte a into b in every slot
        return repeat(bytes(AES_BLOCK_LEN - 1) + bytes((a ^ b,)))

    lsuffix = pad + bytes((n, 3))  # left halves feed passes 3 then 1
    rsuffix = pad + bytes((n, 4))  # right halves feed passes 4 then 2
    left = int.from_bytes(b"".join([cids[i][1 : 1 + h] + lsuffix for i in idx]), "big") & keep_left
    right = int.from_bytes(b"".join([cids[i][1 + n - h : 1 + n] + rsuffix for i in idx]), "big") & keep_right

    def f(half: int) -> int:
        return int.from_bytes(encrypt(half.to_bytes(width, "big")), "big")

    left ^= f(right) & out_left  # L1 = L2 ^ F(4, R2), cleared
    right ^= pass_byte(4, 2)
    right ^= f(left) & out_right  # R1 = R2 ^ F(3, L1), cleared
    left ^= pass_byte(3, 1)
    left ^= f(right) & out_left  # L0 = L1 ^ F(2, R1), cleared
    if 2 * sid_len <= n:  # 3-pass shortcut: the server ID lies in L0
        lb = left.to_bytes(width, "big")
        for k, i in enumerate(idx):
            base = k * AES_BLOCK_LEN
            out[i] = lb[base : base + sid_len]
        return out
    right ^= f(left) & out_right  # R0 = R1 ^ F(1, L0), cleared
    lb, rb = left.to_bytes(width, "big"), right.to_bytes(width, "big")
    for k, i in enumerate(idx):
        base = k * AES_BLOCK_LEN
        lh, rh = lb[base : base + h], rb[base : base + h]
        if params.odd:
            out[i] = (lh[:-1] + bytes((lh[-1] | rh[0],)) + rh[1:])[:sid_len]
        else:
            out[i] = (lh + rh)[:sid_len]
    return out


class CidDecoder:
    """All live configurations of one service, indexed by config bits (the datapath decoder).

    Immutable once built: a reload builds a new one.
    """

    __slots__ = ("by_config_id", "configs")

    def __init__(self, configs: Iterable[CidConfig]) -> None:
        self.configs: tuple[CidConfig, ...] = tuple(configs)
        table: list[ConfigDecoder | None] = [None] * 8
        for cfg in self.configs:
            if table[cfg.config_id] is not None:
                raise ValueError(f"config_id: {cfg.config_id} appears twice")
            table[cfg.config_id] = ConfigDecoder(cfg)
        self.by_config_id: tuple[ConfigDecoder | None, ...] = tuple(table)

    def decoder_for(self, cid: bytes) -> ConfigDecoder | None:
        """The configuration decoder the CID's config bits select (``None`` for 0b111 or unknown)."""
        return self.by_config_id[cid[0] >> 5] if cid else None

    def decode(self, cid: bytes) -> bytes | None:
        """Scalar decode: server ID or ``None`` when unroutable."""
        if not cid:
            return None
        dec = self.by_config_id[cid[0] >> 5]
        if dec is None or len(cid) < dec.cid_len:
            return None
        return dec.decode(cid)

    def decode_many(self, cids: Sequence[bytes]) -> list[bytes | None]:
        """Batch decode: CIDs are grouped by configuration, one AES call per pass per group."""
        out: list[bytes | None] = [None] * len(cids)
        groups: dict[int, list[int]] = {}
        for i, cid in enumerate(cids):
            if cid and self.by_config_id[cid[0] >> 5] is not None:
                groups.setdefault(cid[0] >> 5, []).append(i)
        for config_id, idx in groups.items():
            dec = self.by_config_id[config_id]
            assert dec is not None
            for i, sid in zip(idx, dec.decode_many([cids[i] for i in idx]), strict=True):
                out[i] = sid
        return out
