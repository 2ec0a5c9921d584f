"""FifoCache equals the obvious FIFO (an OrderedDict dropping its oldest entry) for any sequence of adds."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.core.fifo_cache import FifoCache


class Reference:
    """The model: add one by one, drop the oldest while over size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, int] = OrderedDict()
        self.evictions = 0

    def add(self, key: bytes, value: int) -> None:
        if not self.size:
            return
        if len(self.entries) >= self.size:
            self.entries.popitem(last=False)
            self.evictions += 1
        self.entries[key] = value


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(0, 9),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 14)), max_size=25),
    clear_at=st.integers(-1, 25),
)
def test_any_sequence_of_adds_leaves_what_adding_one_by_one_leaves(
    size: int, steps: list[tuple[bool, int]], clear_at: int
) -> None:
    cache: FifoCache[int] = FifoCache(size)
    model = Reference(size)
    evictions = 0
    serial = 0
    for step, (batched, count) in enumerate(steps):
        if step == clear_at:
            cache.clear()
            model.entries.clear()
        keys = [k.to_bytes(4, "big") + b"k" for k in range(serial, serial + count)]
        serial += count
        values = list(range(len(keys)))
        if batched:
            evictions += cache.add_many(keys, values)
        else:
            for k, v in zip(keys, values, strict=True):
                evictions += cache.add(k, v)
        for k, v in zip(keys, values, strict=True):
            model.add(k, v)
        assert list(cache.entries.items()) == list(model.entries.items())
        assert len(cache) == len(model.entries) <= size
    if clear_at < 0 or clear_at >= len(steps):  # a clear drops entries without counting them as evicted
        assert evictions == model.evictions


def test_a_full_cache_of_64k_keeps_its_size_across_batches_that_wrap_the_ring() -> None:
    cache: FifoCache[int] = FifoCache(65536)
    left = 0
    for b in range(1100):  # 70400 keys: the ring fills, then wraps (65536 is not a multiple of 64 + 7)
        keys = [(b * 71 + i).to_bytes(4, "big") for i in range(71)]
        left += cache.add_many(keys, [b] * 71)
    assert len(cache) == 65536 and left == 1100 * 71 - 65536
    assert next(iter(cache.entries)) == (1100 * 71 - 65536).to_bytes(4, "big")  # the oldest still there


def test_a_negative_size_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cache size"):
        FifoCache(-1)
