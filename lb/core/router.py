"""Router: one client datagram in, one routing decision out (design.md §3).

Decision order, cheapest first, so that datagrams failing the size, fixed-bit,
config or length checks never reach a cipher (acceptance D-3):

1. Malformed (empty, truncated, fixed bit clear, CID too long for v1/v2): drop.
2. Long header, version 0 (Version Negotiation from outside): drop (RFC 9000 §6.1).
3. Long header, version the backends do not speak, datagram under 1200 bytes:
   drop (RFC 9000 §5.2.2 MUST; aioquic would answer and reflect).
4. DCID config bits name a live configuration and the DCID is long enough:
   decode. A server ID of an active or draining backend: forward (CID route).
5. Unroutable DCID, long header (client-chosen Initial/0-RTT DCID, or one that
   decodes to an unassigned server ID — 1 time in 8 per live config for random
   DCIDs): keyed Maglev over the 4-tuple (-21 §4.3 baseline), never dropped.
6. Unroutable DCID, short header: dropped and counted by reason (every backend
   holds a configuration, so it is garbage or stale), or sent to the fallback
   when the service is configured with ``unroutable_short_header = "fallback"``.

Every datagram ends in exactly one :class:`Outcome`, and each outcome has one
counter: the counters always sum to the datagrams routed.

Two entry points with the same decisions and counters: :meth:`Router.route`,
one datagram at a time (the reference, written to read like the list above),
and :meth:`Router.route_batch`, which the adapters call: cache hits first,
then every cache miss of the batch decoded together (one AES call per pass per
configuration, not per datagram), then fallbacks. Property tests hold the two
equal for any mix of datagrams.

Sans-IO: no sockets, no clock, no logging. The adapter calls the router and
sends each datagram to the returned backend.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable

from lb.core.addresses import Address
from lb.core.batch_routing import BatchRouting
from lb.core.cid_decoder import ConfigDecoder
from lb.core.fifo_cache import FifoCache
from lb.core.lb_replies import RESET, RETRY, LbReplies
from lb.core.maglev import four_tuple_key
from lb.core.outcomes import OUTCOMES, CidRoute, LongHeader, Outcome, RouteDecision, RouterStats
from lb.core.quic_constants import MIN_INITIAL_DATAGRAM
from lb.core.quic_header import RoutingFields, parse_routing_fields_untrusted
from lb.core.retry_token import MAX_ODCID_LEN, MIN_ODCID_LEN
from lb.core.service_table import Backend, ServiceTable
from lb.core.stateless_packets import initial_token
from lb.core.strided_unpack import StridedUnpack
from lb.errors import MalformedDatagram

#: Upper bound of the DCID -> backend cache; FIFO eviction beyond it.
DEFAULT_CACHE_SIZE = 65536




class Router(BatchRouting):
    """Routes the datagrams of one service against its current :class:`ServiceTable`.

    ``set_table`` swaps the table atomically (one reference assignment) and
    clears the decode cache, whose entries belong to the old table.
    """

    def __init__(
        self,
        table: ServiceTable,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size: must be >= 0 (0 disables the cache), got {cache_size}")
        self.table = table
        self._cache: FifoCache[CidRoute] = FifoCache(cache_size)  # DCID -> route, FIFO-bounded
        self._cache_size = cache_size
        self._counts = [0] * len(OUTCOMES)  # CID_ROUTED lives in the CidRoute counters
        self._malformed: dict[str, int] = {}
        # The current table's routes, by config ID then server ID (the batch path maps a batch's
        # decoded server IDs through one config's dict with ``dict.get``).
        self._routes: dict[int, dict[bytes, CidRoute]] = {}
        self._retired_cid_routed: dict[tuple[int, str], int] = {}  # counts of earlier tables' routes
        self._fallback_routed: dict[str, int] = {}
        # Cache hits of whole batches are logged (one list.extend per batch) and counted when
        # read or when the log grows long: Counter.update per batch cost as much as a small batch.
        self._hit_log: list[CidRoute] = []
        self._hits: Counter[CidRoute] = Counter()
        # (batch size, stride, DCID length) -> one struct's unpack_from for the batch's DCIDs
        self._dcid_structs: dict[tuple[int, int, int], StridedUnpack] = {}
        self._cipher_calls = 0
        self._evictions = 0
        self._rx = 0
        #: Retry and reset packets the LB builds (rate limits, counters, the send queue). The
        #: clock (wall time, from the adapter: tokens carry POSIX expiries shared with the
        #: backends) and the random source are only read for those.
        self.replies = LbReplies(clock, random_bytes)

    def set_table(self, table: ServiceTable) -> None:
        # Counters are monotonic: fold the old table's per-route counts into the totals.
        self.count_logged_hits()
        for route in self._all_routes():
            key = (route.config_id, route.label)
            self._retired_cid_routed[key] = self._retired_cid_routed.get(key, 0) + route.count + self._hits[route]
        self._routes = {}
        self._hits = Counter()
        self._cache.clear()
        self.table = table

    # -- the datapath ---------------------------------------------------------

    def route(self, datagram: bytes, client: Address) -> RouteDecision:
        """Decide the fate of one client datagram; ``client`` is (ip, port) as received."""
        self._rx += 1
        size = len(datagram)
        if size == 0:
            return self._malformed_drop("empty")
        first = datagram[0]
        table = self.table
        if not first & 0x80:
            # Short header (RFC 8999 §5.2): the fast path, parsed inline.
            if not first & 0x40:
                return self._malformed_drop("fixed_bit")
            if size < 2:
                return self._malformed_drop("truncated")
            dec = table.decoder.by_config_id[datagram[1] >> 5]
            if dec is None or size < 1 + dec.cid_len:
                return self._unroutable_short(Outcome.FALLBACK_NO_CONFIG, Outcome.UNROUTABLE_DROPPED, client)
            dcid = datagram[1 : 1 + dec.cid_len]
            route = self._cache.entries.get(dcid)
            if route is not None:
                route.count += 1
                return route.decision
            self._cipher_calls += dec.cfg.lb_passes
            sid = dec.decode(dcid)
            backend = table.backends.get(sid)
            if backend is None:
                if sid in table.tombstones:
                    # Never to the fallback, even with the switch on: the connection lived on a
                    # backend that is gone, and any other backend would only answer garbage.
                    return self._removed_backend(sid, dcid, size, client)
                return self._unroutable_short(
                    Outcome.FALLBACK_SHORT_UNKNOWN_SID, Outcome.UNKNOWN_SID_DROPPED, client
                )
            return self._cid_route(dcid, dec.cfg.config_id, backend)

        checked = self._check_long_header(datagram, lambda: client)
        if not isinstance(checked, LongHeader):
            return checked
        dcid, dec, reason, supported = checked
        if dec is not None:
            key = dcid[: dec.cid_len]
            route = self._cache.entries.get(key)
            if route is not None:
                route.count += 1
                return route.decision
            self._cipher_calls += dec.cfg.lb_passes
            backend = table.backends.get(dec.decode(key))
            if backend is not None:
                return self._cid_route(key, dec.cfg.config_id, backend)
            if supported:
                reason = Outcome.FALLBACK_UNKNOWN_SID
        return self._fallback(reason, client)

    # -- outcomes -------------------------------------------------------------

    def _check_long_header(self, datagram: bytes, client: Callable[[], Address]) -> RouteDecision | LongHeader:
        """Steps 1-3 for a long header (shared by both entry points): a drop, or what to route by.

        With Retry offload on, an Initial also passes :meth:`_retry_gate` here.
        """
        table = self.table
        try:
            fields = parse_routing_fields_untrusted(datagram, table.supported_versions)
        except MalformedDatagram as exc:
            return self._malformed_drop(exc.reason)
        version = fields.version
        if version == 0:
            return self._drop(Outcome.VN_DROPPED)
        supported = version in table.supported_versions
        if not supported and len(datagram) < MIN_INITIAL_DATAGRAM:
            return self._drop(Outcome.SMALL_UNKNOWN_VERSION_DROPPED)
        dcid = fields.dcid
        reason = Outcome.FALLBACK_INITIAL if supported else Outcome.FALLBACK_UNKNOWN_VERSION
        dec = table.decoder.by_config_id[dcid[0] >> 5] if dcid else None
        if dec is not None and len(dcid) < dec.cid_len:
            dec = None  # too short for its configuration: as unroutable as an unknown one
        if table.retry is not None and fields.is_initial:
            gated = self._retry_gate(datagram, fields, dec, client)
            if gated is not None:
                return gated
        return LongHeader(dcid, dec, reason, supported)

    def _retry_gate(
        self, datagram: bytes, fields: RoutingFields, dec: ConfigDecoder | None, client: Callable[[], Address]
    ) -> RouteDecision | None:
        """Retry offload for one Initial: None lets it be routed, else the drop or the Retry.

        An Initial whose DCID routes to a live backend belongs to a handshake that
        backend has admitted (the client switched to the backend's CID; its later
        Initials still carry the token, which was bound to the Retry's SCID): it
        goes through, token or not, and the backend checks any token itself should
        it have to open a connection. Otherwise a token is checked here and only a
        valid one is routed; a tokenless Initial gets a Retry while Retry is active.
        The Retry's SCID is unroutable, so the retried Initial comes back through
        the fallback and its token is checked here.
        """
        table = self.table
        policy = table.retry
        assert policy is not None and fields.scid is not None
        dcid = fields.dcid
        token = initial_token(datagram, len(dcid), len(fields.scid))
        if token is None:
            return self._malformed_drop("truncated")
        if dec is not None and self._routes_to_live_backend(dcid[: dec.cid_len], dec):
            return None
        replies = self.replies
        if token and not token[0] & 0x80:  # a Retry token (type 0); NEW_TOKEN ones are never ours
            if replies.token_valid(policy, token, client(), dcid):
                return None
            return self._drop(Outcome.TOKEN_REJECTED)
        if not replies.retry_active(policy):
            return None
        if len(datagram) < MIN_INITIAL_DATAGRAM:
            return self._malformed_drop("small_initial")  # no server may answer it (RFC 9000 §14.1)
        if not MIN_ODCID_LEN <= len(dcid) <= MAX_ODCID_LEN:
            return self._malformed_drop("initial_dcid")  # a client's first DCID has 8..20 bytes (RFC 9000 §7.2)
        address = client()
        if table.maglev.lookup(four_tuple_key(address, table.vip)) is None:
            return self._drop(Outcome.NO_BACKEND_DROPPED)
        assert fields.version is not None
        if replies.retry(policy, address, version=fields.version, odcid=dcid, client_scid=fields.scid):
            return self._drop(Outcome.RETRY_SENT)
        return self._drop(Outcome.RETRY_RATE_LIMITED)

    def _routes_to_live_backend(self, key: bytes, dec: ConfigDecoder) -> bool:
        if key in self._cache.entries:
            return True
        self._cipher_calls += dec.cfg.lb_passes
        return self.table.backends.get(dec.decode(key)) is not None

    def _removed_backend(self, sid: bytes, dcid: bytes, size: int, client: Address) -> RouteDecision:
        """A short header for a removed backend's CID: a Stateless Reset when the service has a
        reset key (rate-limited, shorter than the trigger), else a counted drop."""
        key = self.table.reset_key
        if key is not None and self.replies.reset(key, sid, dcid, client, size):
            return self._drop(Outcome.RESET_SENT)
        return self._drop(Outcome.REMOVED_BACKEND_DROPPED)

    def _cid_route(self, dcid: bytes, config_id: int, backend: Backend) -> RouteDecision:
        """A decoded (cache-miss) CID route: count it and remember the DCID."""
        route = self._route_of(config_id, backend)
        route.count += 1
        self._remember(dcid, route)
        return route.decision

    def _route_of(self, config_id: int, backend: Backend) -> CidRoute:
        """The current table's route of (configuration, backend), made on first use."""
        by_sid = self._routes.setdefault(config_id, {})
        route = by_sid.get(backend.server_id)
        if route is None:
            route = by_sid[backend.server_id] = CidRoute(config_id, backend)
        return route

    def _all_routes(self) -> list[CidRoute]:
        return [route for by_sid in self._routes.values() for route in by_sid.values()]

    def _fallback(self, outcome: Outcome, client: Address) -> RouteDecision:
        table = self.table
        sid = table.maglev.lookup(four_tuple_key(client, table.vip))
        if sid is None:
            return self._drop(Outcome.NO_BACKEND_DROPPED)
        self._counts[outcome] += 1
        backend = table.backends[sid]
        self._fallback_routed[backend.label] = self._fallback_routed.get(backend.label, 0) + 1
        return outcome, backend

    def _unroutable_short(self, fallback: Outcome, drop: Outcome, client: Address) -> RouteDecision:
        if self.table.short_header_fallback:
            return self._fallback(fallback, client)
        return self._drop(drop)

    def _drop(self, outcome: Outcome) -> RouteDecision:
        self._counts[outcome] += 1
        return outcome, None

    def _malformed_drop(self, reason: str) -> RouteDecision:
        self._counts[Outcome.MALFORMED_DROPPED] += 1
        self._malformed[reason] = self._malformed.get(reason, 0) + 1
        return Outcome.MALFORMED_DROPPED, None

    def _remember(self, dcid: bytes, route: CidRoute) -> None:
        self._evictions += self._cache.add(dcid, route)

    # -- observation ----------------------------------------------------------

    def count_logged_hits(self) -> None:
        """Fold the batch hit log into the per-route counts (C-level: one Counter.update)."""
        if self._hit_log:
            self._hits.update(self._hit_log)
            self._hit_log = []

    def stats(self) -> RouterStats:
        self.count_logged_hits()
        cid_routed = dict(self._retired_cid_routed)
        for route in self._all_routes():
            key = (route.config_id, route.label)
            cid_routed[key] = cid_routed.get(key, 0) + route.count + self._hits[route]
        outcomes = {o: self._counts[o] for o in OUTCOMES}
        outcomes[Outcome.CID_ROUTED] = sum(cid_routed.values())
        return RouterStats(
            service=self.table.name,
            rx_client_datagrams=self._rx,
            outcomes=outcomes,
            malformed=dict(self._malformed),
            cid_routed=cid_routed,
            fallback_routed=dict(self._fallback_routed),
            cipher_calls=self._cipher_calls,
            cache_entries=len(self._cache),
            cache_evictions=self._evictions,
            lb_originated={kind: self.replies.sent[kind] for kind in (RETRY, RESET)},
            lb_originated_rate_limited=dict(self.replies.rate_limited),
            lb_originated_bytes=self.replies.bytes_sent,
            retry_tokens=dict(self.replies.tokens),
        )
