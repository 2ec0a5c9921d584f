"""Server-side CID issuance: nonces that never repeat under one key (-21 §5.4, §9.6).

Nonce construction: a counter that starts at a random value and adds one per
CID, modulo ``2**(8 * nonce_len)`` (the draft's counter method). The issuer
stops *before* the counter could come back to a value it already used, and
from then on issues self-describing 0b111 CIDs (-21 §9.6) until it is given a
new configuration; ``exhausted`` and ``nearly_exhausted`` say so.

In plaintext mode the nonce is on the wire, and a visible counter would link
every CID of a connection (-21 §5.4, trap T14). There the counter goes through
a keyed permutation of the nonce space (a 4-round Feistel network with AES as
round function, key local to the issuer): still a bijection, so still no
repeats, but consecutive nonces look unrelated. Keyed modes use the same
permutation: it costs little and makes nonces hard to guess, which blunts the
four-pass distinguishing attacks (-21 §9.7).

Not thread-safe: one issuer per process (aioquic backends are single-threaded).
"""

from __future__ import annotations

import secrets

from lb.core.cid_cipher import aes_ecb
from lb.core.cid_config import CidConfig
from lb.core.cid_encoder import encode_cid, unroutable_cid

#: Rounds of the nonce permutation; 4 is the Luby-Rackoff bound for a strong PRP.
PERMUTATION_ROUNDS = 4
#: Share of the nonce budget after which ``nearly_exhausted`` turns true.
DEFAULT_WARN_FRACTION = 0.9


class NoncePermutation:
    """A keyed bijection on ``bits``-bit values (balanced Feistel), written as ``nonce_len`` bytes.

    ``bits`` (default ``8 * nonce_len``) is even, so the two halves have equal
    width; each round XORs one half with AES(key, round || other half)
    truncated to the half width. Any round function gives a permutation, so
    uniqueness holds whatever the key, and the image of ``range(2**bits)`` is
    ``range(2**bits)`` again: a small space can be checked exhaustively.
    """

    __slots__ = ("_encrypt", "_half_bits", "_half_bytes", "_mask", "_nonce_len")

    def __init__(self, nonce_len: int, key: bytes, *, bits: int | None = None) -> None:
        bits = 8 * nonce_len if bits is None else bits
        if bits % 2 or not 2 <= bits <= 8 * nonce_len:
            raise ValueError(f"bits: must be even and 2..{8 * nonce_len}, got {bits}")
        self._nonce_len = nonce_len
        self._half_bits = bits // 2
        self._half_bytes = (self._half_bits + 7) // 8
        self._mask = (1 << self._half_bits) - 1
        self._encrypt = aes_ecb(key).encrypt

    def _round(self, round_no: int, half: int) -> int:
        block = bytes((round_no,)) + half.to_bytes(self._half_bytes, "big")
        out = self._encrypt(block + bytes(16 - len(block)))
        return int.from_bytes(out[: self._half_bytes], "big") & self._mask

    def apply(self, value: int) -> bytes:
        left, right = value >> self._half_bits, value & self._mask
        for r in range(PERMUTATION_ROUNDS):
            left, right = right, left ^ self._round(r, right)
        return ((left << self._half_bits) | right).to_bytes(self._nonce_len, "big")


class CidIssuer:
    """Mints the CIDs of one server ID under one configuration.

    ``max_cids`` caps how many routable CIDs this issuer makes (default: the
    whole nonce space). Operators lower it to rotate keys early; tests use it to
    reach exhaustion quickly.

    ``nonce_bits`` narrows the nonce space to ``2**nonce_bits`` values (even,
    default ``8 * nonce_len``; the high bits of the nonce are then zero). Only
    for tests: the smallest legal nonce (4 bytes) is too big to exhaust, and
    exhausting a space is the one check that tells a permutation of a counter
    (every nonce exactly once) from random nonces (repeats by the birthday bound).
    """

    def __init__(
        self,
        cfg: CidConfig,
        server_id: bytes,
        *,
        max_cids: int | None = None,
        warn_fraction: float = DEFAULT_WARN_FRACTION,
        nonce_bits: int | None = None,
    ) -> None:
        if len(server_id) != cfg.server_id_len:
            raise ValueError(f"server_id: must be {cfg.server_id_len} bytes for config {cfg.config_id}")
        nonce_bits = 8 * cfg.nonce_len if nonce_bits is None else nonce_bits
        if nonce_bits % 2 or not 2 <= nonce_bits <= 8 * cfg.nonce_len:  # the Feistel halves are equal
            raise ValueError(f"nonce_bits: must be even and 2..{8 * cfg.nonce_len}, got {nonce_bits}")
        space = 1 << nonce_bits
        if max_cids is not None and max_cids < 1:
            raise ValueError(f"max_cids: must be at least 1, got {max_cids}")
        self.cfg = cfg
        self.server_id = bytes(server_id)
        self.limit = space if max_cids is None else min(max_cids, space)
        self._space = space
        self._start = secrets.randbelow(space)  # random start (-21 §9.6 SHOULD)
        self._permutation = NoncePermutation(cfg.nonce_len, secrets.token_bytes(16), bits=nonce_bits)
        self._warn_at = int(self.limit * warn_fraction)
        self.issued = 0
        self.unroutable_issued = 0

    @property
    def cid_len(self) -> int:
        return self.cfg.cid_len

    @property
    def remaining(self) -> int:
        return self.limit - self.issued

    @property
    def exhausted(self) -> bool:
        """True once every allowed nonce is used; ``next_cid`` then returns 0b111 CIDs."""
        return self.issued >= self.limit

    @property
    def nearly_exhausted(self) -> bool:
        """True from ``warn_fraction`` of the budget on: time to roll out a new configuration."""
        return self.issued >= self._warn_at

    def next_nonce(self) -> bytes | None:
        """The next unused nonce, or ``None`` when the budget is spent."""
        if self.issued >= self.limit:
            return None
        counter = (self._start + self.issued) % self._space
        self.issued += 1
        return self._permutation.apply(counter)

    def next_cid(self) -> bytes:
        """A fresh routable CID, or a self-describing 0b111 CID of the same length once exhausted."""
        nonce = self.next_nonce()
        if nonce is None:
            self.unroutable_issued += 1
            return unroutable_cid(self.cfg.cid_len)
        return encode_cid(self.cfg, self.server_id, nonce)
