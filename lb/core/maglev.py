"""Keyed Maglev consistent hashing: the fallback for datagrams whose DCID the client chose.

Maglev (Eisenbud et al., NSDI 2016, §3.4) gives every backend a permutation of
the ``M`` table slots, derived from an *offset* and a *skip*, and fills the
table round-robin: each backend in turn takes the next free slot of its
permutation. Every backend therefore owns ``floor(M/N)`` or ``ceil(M/N)``
slots (balance first), and adding or removing one backend moves few slots of
the others (small, but not minimal, disruption).

Properties this module guarantees, because the LB tier is stateless:

* **Same answer in every process.** Backends are sorted before the build and
  every hash is ``blake2b`` — never Python's ``hash()``, which is salted per
  process — so two LB instances with the same names, key and size build
  byte-identical tables.
* **Unsteerable.** All hashes are keyed with a secret shared by the LB
  instances, so a client choosing its source port cannot aim at a backend
  (RFC 9000 §21.13), and an attacker cannot predict the permutations.
* **Domain separation.** Offset, skip and flow hashes use distinct blake2b
  ``person`` strings, so none of them can be derived from another.

The table is an immutable value built off the hot path; the datapath only
calls :meth:`MaglevTable.lookup`.
"""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lb.core.addresses import packed_host

#: The paper's small table size: prime, and >= 100 x backends up to 655 backends.
DEFAULT_TABLE_SIZE = 65537

#: blake2b accepts keys of at most 64 bytes.
MAX_KEY_LEN = 64
#: The paper keeps shares within ~1% when M >= 100 x N (Maglev §5.3).
MIN_SLOTS_PER_BACKEND = 100

# blake2b personalisation strings (at most 16 bytes each): one per use of the key.
_PERSON_OFFSET = b"quiclb-mglv-off"
_PERSON_SKIP = b"quiclb-mglv-skip"
_PERSON_FLOW = b"quiclb-mglv-flow"

# Slot arrays store indexes into ``names``; 'H' halves memory while it fits.
_MAX_H_NAMES = 0x10000

# Deterministic Miller-Rabin witnesses: exact for every n < 3.3e24 (Sorenson & Webster 2015).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)

# Port pair of a 4-tuple key: client port, VIP port, network byte order.
_PORTS = struct.Struct(">HH")

# Packed client addresses are cached because ipaddress parsing costs microseconds per
# datagram; the bound keeps a flood of spoofed sources from growing memory.
_ADDR_CACHE_SIZE = 8192


def is_prime(n: int) -> bool:
    """Return whether ``n`` is prime (deterministic Miller-Rabin; exact for table sizes)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"maglev key must be bytes, got {type(key).__name__}")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"maglev key is {len(key)} bytes; blake2b allows at most {MAX_KEY_LEN}")


def keyed_hash64(key: bytes, data: bytes, *, person: bytes = b"") -> int:
    """Return ``blake2b(data, key=key, person=person, digest_size=8)`` as a big-endian integer.

    ``person`` separates uses of one key; the default (empty) is plain keyed blake2b.
    """
    digest = hashlib.blake2b(data, key=key, person=person, digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=_ADDR_CACHE_SIZE)
def _packed_addr(host: str) -> bytes:
    """Length-prefixed packed address; IPv4-mapped IPv6 is folded to IPv4.

    Folding matters because a dual-stack socket reports an IPv4 client as
    ``::ffff:a.b.c.d``; both spellings must pick the same backend.
    """
    packed = packed_host(host)
    return bytes((len(packed),)) + packed


def four_tuple_key(client: tuple[str, int], vip: tuple[str, int]) -> bytes:
    """Canonical flow key for the fallback: client address/port and VIP address/port.

    Layout: ``len | client IP | len | VIP IP | client port | VIP port``. The
    length prefixes (4 or 16) make the encoding unambiguous; IPv6 scope IDs
    are dropped because they are local to the host. Raises ``ValueError``
    for a host that is not an IP literal or a port outside 0..65535.
    """
    try:
        return _packed_addr(client[0]) + _packed_addr(vip[0]) + _PORTS.pack(client[1], vip[1])
    except struct.error as exc:
        raise ValueError(f"port out of range in {client!r} / {vip!r}") from exc


@dataclass(frozen=True)
class MaglevTable:
    """An immutable Maglev lookup table.

    ``names`` are the backend names (server IDs) in sorted order; ``slots``
    maps each of the ``size`` slots to an index into ``names`` and is empty
    when there are no backends. ``key`` is the shared secret that keys every
    hash. Build it with :func:`build_maglev_table`.
    """

    names: tuple[bytes, ...]
    size: int
    slots: array.array[int]
    key: bytes = field(default=b"", repr=False)
    # Keyed blake2b state cloned per lookup: copying skips re-absorbing the key block,
    # which makes a lookup about 40% cheaper than constructing a fresh keyed hasher.
    _flow_proto: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key(self.key)
        expected = self.size if self.names else 0
        if len(self.slots) != expected:
            raise ValueError(f"maglev table has {len(self.slots)} slots, expected {expected}")
        if self.slots and max(self.slots) >= len(self.names):
            raise ValueError("maglev table slot refers to a missing backend")
        object.__setattr__(self, "_flow_proto", _flow_hasher(self.key))

    # The blake2b state cannot be pickled; rebuild it from the key instead.
    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "size": self.size, "slots": self.slots, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_flow_proto", _flow_hasher(self.key))

    def flow_hash(self, flow_key: bytes) -> int:
        """The 64-bit keyed hash of a flow key (domain-separated from the build hashes)."""
        h = self._flow_proto.copy()
        h.update(flow_key)
        return int.from_bytes(h.digest(), "big")

    def lookup(self, flow_key: bytes) -> bytes | None:
        """Return the backend name for ``flow_key``, or ``None`` when the table has no backends."""
        if not self.names:
            return None
        h = self._flow_proto.copy()
        h.update(flow_key)
        return self.names[self.slots[int.from_bytes(h.digest(), "big") % self.size]]

    def lookup_hash(self, h: int) -> bytes | None:
        """Return the backend name for an already computed :meth:`flow_hash`."""
        if not self.names:
            return None
        return self.names[self.slots[h % self.size]]


def _flow_hasher(key: bytes) -> Any:
    return hashlib.blake2b(key=key, person=_PERSON_FLOW, digest_size=8)


def _check_size(size: int, n: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"maglev table size must be an int, got {type(size).__name__}")
    if not is_prime(size):
        raise ValueError(f"maglev table size {size} is not prime")
    minimum = MIN_SLOTS_PER_BACKEND * n
    if size < minimum:
        raise ValueError(
            f"maglev table size {size} must be at least {MIN_SLOTS_PER_BACKEND} x backends = {minimum}"
        )


def build_maglev_table(names: Iterable[bytes], key: bytes, size: int = DEFAULT_TABLE_SIZE) -> MaglevTable:
    """Build the Maglev table for ``names`` under ``key`` (Maglev §3.4, Pseudocode 1).

    ``size`` must be prime (so every skip walks a full permutation) and at
    least 100 x the number of backends. Names are sorted first, so the result
    does not depend on input order. Raises ``ValueError`` on a bad size, a
    duplicate name or an over-long key.
    """
    ordered = tuple(sorted(names))
    for name in ordered:
        if not isinstance(name, bytes):
            raise TypeError(f"maglev backend name must be bytes, got {type(name).__name__}")
    for a, b in itertools.pairwise(ordered):
        if a == b:
            raise ValueError(f"duplicate maglev backend name {a.hex()}")
    _check_key(key)
    n = len(ordered)
    _check_size(size, n)
    if n == 0:
        return MaglevTable(names=(), size=size, slots=array.array("H"), key=key)

    m = size
    # ``pos`` holds each backend's current permutation slot, (offset + j * skip) mod M,
    # advanced by addition instead of recomputing the product every probe.
    pos = [keyed_hash64(key, name, person=_PERSON_OFFSET) % m for name in ordered]
    skips = [keyed_hash64(key, name, person=_PERSON_SKIP) % (m - 1) + 1 for name in ordered]
    typecode = "H" if n < _MAX_H_NAMES else "I"
    slots = array.array(typecode, bytes(m * array.array(typecode).itemsize))
    filled = bytearray(m)
    remaining = m
    backends = list(zip(range(n), skips, strict=True))
    while True:
        for i, skip in backends:
            c = pos[i]
            while filled[c]:
                c += skip
                if c >= m:
                    c -= m
            filled[c] = 1
            slots[c] = i
            c += skip
            if c >= m:
                c -= m
            pos[i] = c
            remaining -= 1
            if not remaining:
                return MaglevTable(names=ordered, size=m, slots=slots, key=key)


def moved_fraction(old: MaglevTable, new: MaglevTable) -> float:
    """Share of slots whose backend name differs between two tables of the same size."""
    if old.size != new.size:
        raise ValueError(f"cannot compare maglev tables of sizes {old.size} and {new.size}")
    if not old.names and not new.names:
        return 0.0
    if not old.names or not new.names:
        return 1.0
    new_index = {name: i for i, name in enumerate(new.names)}
    # Translate old indexes into new ones (-1: backend gone) so the comparison is index-wise.
    remap = [new_index.get(name, -1) for name in old.names]
    moved = sum(1 for a, b in zip(old.slots, new.slots, strict=True) if remap[a] != b)
    return moved / old.size
