"""One ``struct`` call that reads the same field out of every record of a strided buffer.

The batched datapath keeps a batch's datagrams (and their sockaddrs) in fixed
slots ``stride`` bytes apart. Reading one field of each slot by slicing costs a
Python-level call per slot; a struct format of ``count`` repeats of "skip
``offset``, take ``length``, skip the rest of the slot" reads them all in one
C call (about a third of the cost, measured in ``bench/micro_datapath.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

#: ``unpack_from`` of a strided-field struct: one ``bytes`` per record.
StridedUnpack = Callable[..., tuple[Any, ...]]


def strided_unpack(offset: int, length: int, count: int, stride: int) -> StridedUnpack:
    """``unpack_from`` giving the ``length`` bytes at ``offset`` of each of ``count`` records ``stride`` apart.

    The last record's tail is not part of the format, so a buffer that ends right after
    the last field is long enough.
    """
    one = f"{offset}x{length}s"
    return struct.Struct("=" + f"{one}{stride - offset - length}x" * (count - 1) + one).unpack_from


#: Record counts up to this keep their struct in :func:`cut_records` (the datapath's batches hold 64).
MAX_CACHED_RECORDS = 256


def cut_records(data: bytes, stride: int, length: int, count: int) -> list[bytes]:
    """The first ``length`` bytes of each of ``count`` records ``stride`` apart (e.g. server IDs out of AES output)."""
    if count > MAX_CACHED_RECORDS:
        return [data[k : k + length] for k in range(0, count * stride, stride)]
    return list(_cutter(0, length, count, stride)(data))


# Sized for every (stride, length) a service's configurations ask for, at every batch size up
# to 64, without evictions: an evicted struct would be compiled again on the hot path.
_cutter = lru_cache(maxsize=1024)(strided_unpack)
