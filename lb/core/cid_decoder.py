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

from lb.core.cid_cipher import AES_BLOCK_LEN, aes_ecb, feistel_cid_decryptor, feistel_params
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig, CidMode
from lb.core.feistel_batch import feistel_sids
from lb.core.strided_unpack import cut_records

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
        return feistel_cid_decryptor(aes.encrypt, feistel_params(n), sid_len)

    def decode_many(self, cids: Sequence[bytes]) -> list[bytes | None]:
        """Decode a batch with one AES call per pass; ``None`` for CIDs that are too short.

        Results equal ``decode`` on every input; the config bits are not checked here.
        """
        if cids and min(map(len, cids)) >= self.cid_len:
            return self._decode_all(cids)  # type: ignore[return-value]  # list[bytes] is a list[bytes | None]
        out: list[bytes | None] = [None] * len(cids)
        idx = [i for i, c in enumerate(cids) if len(c) >= self.cid_len]
        if idx:
            for i, sid in zip(idx, self._decode_all([cids[i] for i in idx]), strict=True):
                out[i] = sid
        return out

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
            return cut_records(plain, AES_BLOCK_LEN, sid_len, count)
        return feistel_sids(aes.encrypt, feistel_params(self.cfg.block_len), sid_len, cids)


#: The AES block of a single-pass CID: the octets after the first.
_BLOCK = slice(1, 1 + AES_BLOCK_LEN)


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
