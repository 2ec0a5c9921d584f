"""Router.route_batch: the batched entry point of the router (a mixin of :class:`lb.core.router.Router`).

Same decisions and counters as :meth:`Router.route` on each datagram in order
(tests/core/test_router_batch.py holds them equal for any mix), in three steps:

1. **Short headers only** (the steady state of a busy LB): when every datagram
   of the batch is a short header long enough for its DCID, the batch's DCIDs
   and cache lookups are a handful of C-level calls — first and second octets
   gathered by strided slices, DCIDs by one ``struct`` call, routes by
   ``map(cache.get, ...)``, hits logged by one list extend (counted when
   read). When all hit, no Python bytecode runs per datagram. Misses of one
   configuration (a cold cache) that are all distinct and all decode to live
   backends are resolved as a whole the same way (``_resolve_unique``: one
   decoder call, one cache update); other misses go to step 3.
2. Otherwise, one pass in Python over the batch: cheap rejects, cache hits,
   and the misses collected by DCID.
3. Every miss of the batch decoded together, one decoder call (one AES call
   per pass) per configuration; then the fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from lb.core.addresses import Address
from lb.core.cid_decoder import ConfigDecoder
from lb.core.fifo_cache import FifoCache
from lb.core.outcomes import ByteSlicer, CidRoute, LongHeader, Outcome, RouteDecision
from lb.core.service_table import Backend, ServiceTable
from lb.core.strided_unpack import StridedUnpack, strided_unpack

#: Placeholder in a batch's decision list until the decision is made (never returned).
_PENDING: RouteDecision = (Outcome.MALFORMED_DROPPED, None)
#: First octets of short headers with the fixed bit (RFC 9000 §17.3): 0b01xxxxxx.
_SHORT_WITH_FIXED_BIT = bytes(range(0x40, 0x80))
#: The DCID's first octets of each config ID (its top three bits, draft -21 §3).
_CONFIG_OCTETS = tuple(bytes(range(c << 5, (c + 1) << 5)) for c in range(8))
#: Below this many datagrams the per-datagram pass costs less than step 1's fixed cost (measured: 6 or fewer).
VECTOR_MIN_BATCH = 7
#: Logged hits are counted once the log holds this many (bounds its memory).
HIT_LOG_FOLD = 65536


class BatchRouting:
    """The batch half of :class:`lb.core.router.Router`; the state and the outcome helpers live there."""

    table: ServiceTable
    _cache: FifoCache[CidRoute]
    _cache_size: int
    _routes: dict[int, dict[bytes, CidRoute]]
    _hit_log: list[CidRoute]
    _cipher_calls: int
    _evictions: int
    _rx: int
    _dcid_structs: dict[tuple[int, int, int], StridedUnpack]

    # Implemented by Router: each counts one outcome and returns its decision.
    def _cid_route(self, dcid: bytes, config_id: int, backend: Backend) -> RouteDecision:
        raise NotImplementedError

    def count_logged_hits(self) -> None:
        raise NotImplementedError

    def _route_of(self, config_id: int, backend: Backend) -> CidRoute:
        raise NotImplementedError

    def _fallback(self, outcome: Outcome, client: Address) -> RouteDecision:
        raise NotImplementedError

    def _check_long_header(self, datagram: bytes, client: Callable[[], Address]) -> RouteDecision | LongHeader:
        raise NotImplementedError

    def _removed_backend(self, sid: bytes, dcid: bytes, size: int, client: Address) -> RouteDecision:
        raise NotImplementedError

    def _unroutable_short(self, fallback: Outcome, drop: Outcome, client: Address) -> RouteDecision:
        raise NotImplementedError

    def _drop(self, outcome: Outcome) -> RouteDecision:
        raise NotImplementedError

    def _malformed_drop(self, reason: str) -> RouteDecision:
        raise NotImplementedError

    def route_batch(
        self,
        buf: bytes | memoryview,
        stride: int,
        lengths: Sequence[int],
        client_at: Callable[[int], Address],
        raw: ByteSlicer | None = None,
    ) -> list[RouteDecision]:
        """Route ``len(lengths)`` datagrams; datagram ``i`` is ``buf[i * stride : i * stride + lengths[i]]``.

        ``client_at(i)`` gives datagram ``i``'s client address; it is called only
        for datagrams that need the fallback, so adapters can decode addresses
        lazily. ``raw`` is the same memory as ``buf`` in a form whose slices are
        ``bytes`` (a ``bytes`` ``buf`` is its own; the recvmmsg adapter passes
        its ctypes buffer, whose slices cost a third of a memoryview's slice
        plus ``bytes()``). Decisions and counters equal :meth:`route` called on
        each datagram in order (the cache's eviction order aside, which may
        differ within one batch when the cache is full).
        """
        if raw is None:
            if not isinstance(buf, bytes):
                raise TypeError("route_batch: pass raw= with a memoryview buffer (its slices must be bytes)")
            raw = buf
        n = len(lengths)
        if n >= VECTOR_MIN_BATCH and stride:
            batch = self._route_short_headers(buf, stride, lengths, n, client_at=client_at)
            if batch is not None:
                return batch
        self._rx += n
        table = self.table
        by_config = table.decoder.by_config_id
        cache_get = self._cache.entries.get
        out: list[RouteDecision] = [_PENDING] * n
        # DCID -> (decoder, indices of the datagrams of this batch that carry it)
        misses: dict[bytes, tuple[ConfigDecoder, list[int]]] = {}
        long_reasons: dict[int, Outcome] = {}
        off = 0
        for i in range(n):
            size = lengths[i]
            if size > 1 and buf[off] & 0xC0 == 0x40:
                # Short header with the fixed bit (RFC 8999 §5.2, RFC 9000 §17.3.1): the fast path.
                dec = by_config[buf[off + 1] >> 5]
                if dec is not None and size > (cid_len := dec.cid_len):
                    dcid = raw[off + 1 : off + 1 + cid_len]
                    route = cache_get(dcid)
                    if route is not None:
                        route.count += 1
                        out[i] = route.decision
                    elif (miss := misses.get(dcid)) is not None:
                        miss[1].append(i)
                    else:
                        misses[dcid] = (dec, [i])
                else:
                    out[i] = self._unroutable_short(
                        Outcome.FALLBACK_NO_CONFIG, Outcome.UNROUTABLE_DROPPED, client_at(i)
                    )
            elif size == 0:
                out[i] = self._malformed_drop("empty")
            elif (first := buf[off]) & 0x80:
                decided = self._route_long(raw[off : off + size], i, client_at, misses, long_reasons)
                if decided is not None:
                    out[i] = decided
            elif not first & 0x40:
                out[i] = self._malformed_drop("fixed_bit")
            else:
                out[i] = self._malformed_drop("truncated")  # a short header of one byte: no DCID
            off += stride
        if misses:
            self._resolve_misses(misses, long_reasons, out, client_at, lengths)
        return out

    def _route_short_headers(
        self,
        buf: bytes | memoryview,
        stride: int,
        lengths: Sequence[int],
        n: int,
        *,
        client_at: Callable[[int], Address],
    ) -> list[RouteDecision] | None:
        """Step 1 of the module header, for batches of short headers only; None leaves the batch to step 2.

        All hits: no Python per datagram. Some misses, all of one configuration (a cold
        cache): only the misses are looked at one by one, then decoded together (step 3).
        """
        # bytes() of the strided gather: bytes methods run in C, memoryview iteration does not.
        if len(buf) < 2 or bytes(buf[0 : n * stride : stride]).translate(None, _SHORT_WITH_FIXED_BIT):
            return None  # some datagram is not a short header with the fixed bit
        config_id = buf[1] >> 5
        dec = self.table.decoder.by_config_id[config_id]
        if dec is None or min(lengths) <= dec.cid_len:  # a DCID cut short would read a stale slot
            return None
        # Every datagram holds its DCID, so the buffer covers the struct below: one call reads
        # every DCID (the alternatives measured slower: a comprehension of slices, 3x).
        unpack = self._dcid_structs.get((n, stride, dec.cid_len))
        if unpack is None:
            unpack = self._dcid_structs[(n, stride, dec.cid_len)] = strided_unpack(1, dec.cid_len, n, stride)
        dcids: tuple[bytes, ...] = unpack(buf)
        routes = list(map(self._cache.entries.get, dcids))
        if None not in routes:
            # A datagram of another configuration was cut at this one's DCID length, which no
            # cached DCID of its own configuration has (cache keys carry their config bits):
            # it cannot hit, so an all-hits batch needs no check of the config bits.
            self._rx += n
            log = self._hit_log
            log += routes  # type: ignore[arg-type]  # no None: checked above
            if len(log) > HIT_LOG_FOLD:
                self.count_logged_hits()
            return [route.decision for route in routes]  # type: ignore[union-attr]  # no None: checked
        seconds = bytes(buf[1 : n * stride : stride])
        if seconds.translate(None, _CONFIG_OCTETS[config_id]):  # misses of several configurations: step 2
            return None
        self._rx += n
        self._hit_log += filter(None, routes)
        if len(self._hit_log) > HIT_LOG_FOLD:
            self.count_logged_hits()
        if None not in (resolved := self._resolve_unique(dec, dcids, routes, n)):
            return [route.decision for route in resolved]  # type: ignore[union-attr]  # no None: checked
        out = [_PENDING if route is None else route.decision for route in routes]
        misses: dict[bytes, tuple[ConfigDecoder, list[int]]] = {}
        for i in [i for i, route in enumerate(routes) if route is None]:
            miss = misses.get(dcids[i])
            if miss is None:
                misses[dcids[i]] = (dec, [i])
            else:
                miss[1].append(i)
        self._resolve_misses(misses, {}, out, client_at, lengths)
        return out

    def _resolve_unique(
        self, dec: ConfigDecoder, dcids: tuple[bytes, ...], routes: list[CidRoute | None], n: int
    ) -> list[CidRoute | None]:
        """Step 3 without Python per datagram, for the cold cache's batches: misses all distinct, all to live backends.

        Returns ``routes`` with every miss resolved; or, when some DCID repeats or decodes to a
        server ID that is no live backend's, ``routes`` as it was, nothing counted (step 3 proper
        then decodes them again: rare, a cold cache's DCIDs are unique and valid). Counted as
        the scalar path counts them: each miss one decode, one route, one cache entry (FIFO:
        inserting all and then evicting the overflow leaves the cache the scalar path leaves).
        """
        if routes.count(None) == n:
            missed: Sequence[bytes] = dcids
        else:
            missed = [dcid for dcid, route in zip(dcids, routes, strict=True) if route is None]
        if len(set(missed)) != len(missed):
            return routes
        config_id = dec.cfg.config_id
        by_sid = self._routes.setdefault(config_id, {})
        # Every DCID of the batch is long enough for its configuration (checked in step 1): no None.
        sids = cast(list[bytes], dec.decode_many(missed))
        found = list(map(by_sid.get, sids))
        if None in found:
            backends = self.table.backends
            for k in [k for k, route in enumerate(found) if route is None]:
                backend = backends.get(sids[k])
                if backend is None:
                    return routes  # unknown or removed: a reset, a drop or the fallback, by step 3
                found[k] = self._route_of(config_id, backend)
        self._cipher_calls += dec.cfg.lb_passes * len(missed)
        resolved = cast(list[CidRoute], found)  # no None: filled above
        self._hit_log += resolved
        if len(self._hit_log) > HIT_LOG_FOLD:
            self.count_logged_hits()
        self._evictions += self._cache.add_many(missed, resolved)
        if missed is dcids:
            return found
        it = iter(resolved)
        return [next(it) if route is None else route for route in routes]

    def _route_long(
        self,
        datagram: bytes,
        i: int,
        client_at: Callable[[int], Address],
        misses: dict[bytes, tuple[ConfigDecoder, list[int]]],
        long_reasons: dict[int, Outcome],
    ) -> RouteDecision | None:
        """Steps 1-5 for a long header; None when its DCID joins the batch's cache misses."""
        checked = self._check_long_header(datagram, lambda: client_at(i))
        if not isinstance(checked, LongHeader):
            return checked
        dcid, dec, reason, supported = checked
        if dec is None:
            return self._fallback(reason, client_at(i))
        key = dcid[: dec.cid_len]
        route = self._cache.entries.get(key)
        if route is not None:
            route.count += 1
            return route.decision
        # Decoded with the batch; an unknown server ID then takes the fallback for this reason.
        long_reasons[i] = Outcome.FALLBACK_UNKNOWN_SID if supported else reason
        miss = misses.get(key)
        if miss is not None:
            miss[1].append(i)
        else:
            misses[key] = (dec, [i])
        return None

    def _resolve_misses(
        self,
        misses: dict[bytes, tuple[ConfigDecoder, list[int]]],
        long_reasons: dict[int, Outcome],
        out: list[RouteDecision],
        client_at: Callable[[int], Address],
        lengths: Sequence[int],
    ) -> None:
        """Decode every missed DCID of a batch, one decoder call (one AES call per pass) per configuration."""
        table = self.table
        # config ID -> (decoder, the DCIDs missed, the datagram indices of each)
        groups: dict[int, tuple[ConfigDecoder, list[bytes], list[list[int]]]] = {}
        for dcid, (dec, indices) in misses.items():
            group = groups.get(dec.cfg.config_id)
            if group is None:
                groups[dec.cfg.config_id] = (dec, [dcid], [indices])
            else:
                group[1].append(dcid)
                group[2].append(indices)
        caching = self._cache_size > 0
        cache, backends = self._cache, table.backends
        for dec, dcids, index_lists in groups.values():
            passes, config_id = dec.cfg.lb_passes, dec.cfg.config_id
            by_sid: dict[bytes | None, CidRoute] = {}  # this batch's routes, by server ID
            for dcid, sid, indices in zip(dcids, dec.decode_many(dcids), index_lists, strict=True):
                route = by_sid.get(sid)
                if route is None and (backend := backends.get(sid) if sid is not None else None) is not None:
                    route = by_sid[sid] = self._route_of(config_id, backend)
                if route is not None:
                    # Like the scalar path: the first datagram decodes and fills the cache, the
                    # others of the batch are cache hits (Router._cid_route and _remember, inlined).
                    self._cipher_calls += passes if caching else passes * len(indices)
                    route.count += len(indices)
                    if caching:
                        self._evictions += cache.add(dcid, route)
                    decision = route.decision
                    for i in indices:
                        out[i] = decision
                    continue
                self._cipher_calls += passes * len(indices)  # unknown server IDs are never cached
                for i in indices:
                    reason = long_reasons.get(i)
                    if reason is not None:
                        out[i] = self._fallback(reason, client_at(i))
                    elif sid in table.tombstones:
                        out[i] = self._removed_backend(sid, dcid, lengths[i], client_at(i))
                    else:
                        out[i] = self._unroutable_short(
                            Outcome.FALLBACK_SHORT_UNKNOWN_SID, Outcome.UNKNOWN_SID_DROPPED, client_at(i)
                        )
