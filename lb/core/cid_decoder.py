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

from lb.core.cid_cipher import AES_BLOCK_LEN, aes_ecb, feistel_decrypt, feistel_params
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig, CidMode

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
        params = feistel_params(n)
        left, right = feistel_decrypt(aes_ecb(cfg.key).encrypt, params, block)
        assert right is not None
        plain = params.join(left, right)
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

    __slots__ = ("cfg", "cid_len", "decode", "mode", "sid_len")

    def __init__(self, cfg: CidConfig) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.sid_len = cfg.server_id_len
        self.cid_len = cfg.cid_len
        self.decode: Callable[[bytes], bytes] = self._build_scalar()

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
        encrypt = aes.encrypt
        params = feistel_params(n)
        half_len = params.half_len

        def four_pass(cid: bytes) -> bytes:
            left, right = feistel_decrypt(encrypt, params, cid[1 : 1 + n], sid_len)
            if right is None:  # 3-pass shortcut: the server ID lies wholly in left_0
                return left.to_bytes(half_len, "big")[:sid_len]
            return params.join(left, right)[:sid_len]

        return four_pass

    def decode_many(self, cids: Sequence[bytes]) -> list[bytes | None]:
        """Decode a batch with one AES call per pass; ``None`` for CIDs that are too short.

        Results equal ``decode`` on every input; the config bits are not checked here.
        """
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
        params = feistel_params(n)
        h, lm, rm = params.half_len, params.left_mask, params.right_mask
        halves = [params.split(bytes(cids[i][1 : 1 + n])) for i in idx]
        lefts = [lr[0] for lr in halves]
        rights = [lr[1] for lr in halves]
        encrypt = aes.encrypt

        def f_many(pass_no: int, values: list[int]) -> list[int]:
            suffix = params.suffixes[pass_no]
            blob = encrypt(b"".join(v.to_bytes(h, "big") + suffix for v in values))
            return [
                int.from_bytes(blob[k * AES_BLOCK_LEN : k * AES_BLOCK_LEN + h], "big")
                for k in range(len(values))
            ]

        lefts = [(a ^ b) & lm for a, b in zip(lefts, f_many(4, rights), strict=True)]
        rights = [(a ^ b) & rm for a, b in zip(rights, f_many(3, lefts), strict=True)]
        lefts = [(a ^ b) & lm for a, b in zip(lefts, f_many(2, rights), strict=True)]
        if 2 * sid_len <= n:
            for k, i in enumerate(idx):
                out[i] = lefts[k].to_bytes(h, "big")[:sid_len]
            return out
        rights = [(a ^ b) & rm for a, b in zip(rights, f_many(1, lefts), strict=True)]
        for k, i in enumerate(idx):
            out[i] = params.join(lefts[k], rights[k])[:sid_len]
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
