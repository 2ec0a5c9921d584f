"""Retry tokens shared with the LB, and stateless resets, for aioquic backends (issue 9).

The sibling of :mod:`backends.routable_cids`: together they are the only
modules that touch aioquic's private names, pinned to aioquic 1.7.2 and
checked by ``tests/backends/test_stateless.py``.

**Retry tokens.** aioquic's ``QuicServer`` calls ``self._retry.create_token``
and ``self._retry.validate_token`` when ``_retry`` is set (``serve(retry=True)``
sets it to a handler with a key private to the process, which breaks behind a
CID-routing LB). :class:`SharedRetryTokens` has the same two methods over the
shared-state token format of :mod:`lb.core.retry_token`, so a token minted by
the LB opens here: aioquic then fills ``original_destination_connection_id``
and ``retry_source_connection_id`` from it, as RFC 9000 §7.3 requires.
:class:`RetryTokens` sets ``_retry`` per datagram: with ``retry = "flood"`` a
tokenless Initial must still open a connection (the LB lets them through while
there is no flood), so the handler is only in place for Initials that carry a
token; with ``"always"`` it stays in place and aioquic itself answers the rare
tokenless Initial that reached it (by a route around the LB) with a Retry.

**Stateless resets.** aioquic draws reset tokens at random and never sends a
reset. :func:`reset_token_source` gives :func:`backends.routable_cids.install_routable_cids`
tokens derived from the shared reset key, this backend's server ID and the CID
(:func:`lb.core.stateless_packets.reset_token`), so a restarted backend knows
the tokens of CIDs its previous process issued, and :class:`Resetter` answers
a short header for a CID of its own that no connection holds with a reset.

**Client side.** aioquic's client never checks received datagrams against the
peer's reset tokens; :func:`is_stateless_reset` and :func:`end_silently` let
the test client (:mod:`backends.client`) notice one and stop, as RFC 9000
§10.3.1 asks (no packet may be sent after a reset).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import NetworkAddress, QuicConnection, QuicConnectionState

from lb.core.addresses import Address
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.core.quic_constants import FIXED_BIT, HEADER_FORM_LONG
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.core.rate_limit import SourceLimiter
from lb.core.retry_token import (
    MAX_ODCID_LEN,
    MIN_ODCID_LEN,
    TokenKey,
    TokenResult,
    make_retry_token,
    open_retry_token,
)
from lb.core.stateless_packets import RESET_TOKEN_LEN, build_reset, initial_token, reset_length, reset_token
from lb.errors import MalformedDatagram

__all__ = [
    "Resetter",
    "RetryTokens",
    "SharedRetryTokens",
    "end_silently",
    "initial_has_token",
    "is_stateless_reset",
    "reset_token_source",
]


class SharedRetryTokens:
    """aioquic's Retry token handler interface over the shared-state format.

    aioquic passes its loop time as ``now``; tokens carry POSIX expiries shared
    with the LB, so the wall clock is read here instead.
    """

    def __init__(self, key: TokenKey, counts: dict[str, int], clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._counts = counts
        self._clock = clock

    def create_token(
        self, *, address: NetworkAddress, original_destination_connection_id: bytes,
        retry_source_connection_id: bytes, now: float,
    ) -> bytes:
        del now
        return make_retry_token(
            self._key, (address[0], address[1]), original_destination_connection_id, retry_source_connection_id,
            now=self._clock(), token_number=secrets.token_bytes(12),
        )

    def validate_token(self, *, address: NetworkAddress, destination_cid: bytes, token: bytes, now: float) -> bytes:
        del now
        result, odcid = open_retry_token(self._key, token, (address[0], address[1]), destination_cid,
                                         now=self._clock())
        self._counts[result.value] = self._counts.get(result.value, 0) + 1
        if result is not TokenResult.VALID or odcid is None:
            raise ValueError(f"retry token {result.value}")  # aioquic answers INVALID_TOKEN
        return odcid


def _initial_fields(datagram: bytes) -> tuple[bytes, bytes | None] | None:
    """(DCID, Token) of the v1/v2 Initial that starts ``datagram``; None for anything else.

    The header is read by the LB's own parser (:mod:`lb.core.quic_header`), so both
    sides agree on what an Initial is. Token is None when its field does not fit.
    """
    try:
        fields = parse_routing_fields_untrusted(datagram)
    except MalformedDatagram:
        return None
    if not fields.is_initial or fields.scid is None:
        return None
    return fields.dcid, initial_token(datagram, len(fields.dcid), len(fields.scid))


def initial_has_token(datagram: bytes) -> bool:
    """Whether ``datagram`` starts with a v1/v2 Initial that carries a token."""
    initial = _initial_fields(datagram)
    return initial is not None and bool(initial[1])


class RetryTokens:
    """Puts :class:`SharedRetryTokens` into a ``QuicServer`` as its mode says."""

    def __init__(self, mode: str, key: TokenKey | None, counts: dict[str, int]) -> None:
        self.mode = mode
        self.handler = SharedRetryTokens(key, counts) if key is not None and mode != "off" else None

        #: "flood" sets the handler per datagram (:meth:`before_datagram`); the others once (:meth:`install`).
        self.per_datagram = self.handler is not None and mode == "flood"

    def refuses(self, datagram: bytes) -> bool:
        """A tokenless Initial with a DCID the token format cannot hold (RFC 9000 §7.2: 8..20 bytes):
        aioquic would ask :class:`SharedRetryTokens` for a Retry token it cannot make. Only such an
        Initial that reached us around the LB (which drops it) can be one."""
        if self.handler is None:
            return False
        initial = _initial_fields(datagram)
        if initial is None:
            return False
        dcid, token = initial
        return not token and not MIN_ODCID_LEN <= len(dcid) <= MAX_ODCID_LEN

    def install(self, server: QuicServer) -> None:
        install_retry_handler(server, None if self.per_datagram else self.handler)

    def before_datagram(self, server: QuicServer, datagram: bytes) -> None:
        """With "flood", before ``server.datagram_received``: tokens are checked, tokenless Initials open
        connections (the LB lets them through while there is no flood)."""
        install_retry_handler(server, self.handler if initial_has_token(datagram) else None)


def reset_token_source(key: bytes | None, server_id: bytes) -> Callable[[bytes], bytes] | None:
    """The reset token of each CID this backend issues; None keeps aioquic's random tokens."""
    if key is None:
        return None
    return lambda cid: reset_token(key, server_id, cid)


class Resetter:
    """Builds resets for short headers whose DCID is one of this backend's CIDs that no connection holds."""

    def __init__(self, key: bytes, server_id: bytes, cid_configs: tuple[CidConfig, ...], cid_len: int) -> None:
        self._key = key
        self._server_id = server_id
        self._configs = {cfg.config_id: cfg for cfg in cid_configs}
        self._cid_len = cid_len
        self._limiter = SourceLimiter()
        self.sent = 0
        self.rate_limited = 0

    def reset_for(self, datagram: bytes, client: Address, now: float) -> bytes | None:
        """The reset to send for ``datagram`` (already known to have an unknown DCID), or None."""
        if not datagram or datagram[0] & (HEADER_FORM_LONG | FIXED_BIT) != FIXED_BIT:
            return None  # long headers are never reset; a clear fixed bit is not our QUIC
        length = reset_length(len(datagram))
        if length is None or len(datagram) < 1 + self._cid_len:
            return None
        cid = bytes(datagram[1 : 1 + self._cid_len])
        cfg = self._configs.get(cid[0] >> 5)
        # Only CIDs that decode to this backend: another backend's CID (possible with the
        # short-header fallback switch) must not draw a reset (RFC 9000 §21.11).
        if cfg is None or cfg.cid_len != self._cid_len or decode_server_id(cfg, cid) != self._server_id:
            return None
        if not self._limiter.allow(client[0], now):
            self.rate_limited += 1
            return None
        self.sent += 1
        token = reset_token(self._key, self._server_id, cid)
        return build_reset(token, length, secrets.token_bytes(length - RESET_TOKEN_LEN))


def peer_reset_tokens(conn: QuicConnection) -> list[bytes]:
    """The stateless reset tokens the peer gave for the CIDs a client connection holds."""
    tokens = [conn._peer_cid.stateless_reset_token]
    tokens += [entry.stateless_reset_token for entry in conn._peer_cid_available]
    return [t for t in tokens if t]


def is_stateless_reset(conn: QuicConnection, datagram: bytes) -> bool:
    """RFC 9000 §10.3.1: a short-header-looking datagram of 21+ bytes ending in a known token."""
    if len(datagram) < 21 or datagram[0] & HEADER_FORM_LONG:
        return False
    tail = datagram[-RESET_TOKEN_LEN:]
    # Compare with every token, in constant time each (RFC 9000 §10.3.1).
    return any([hmac.compare_digest(tail, token) for token in peer_reset_tokens(conn)])


def end_silently(conn: QuicConnection) -> None:
    """Move a connection to its terminal state without sending anything (after a reset)."""
    conn._set_state(QuicConnectionState.TERMINATED)


def install_retry_handler(server: QuicServer, handler: Any) -> None:
    """Set aioquic's Retry handler (``None``: no Retry, no token checks; duck-typed like aioquic's own)."""
    server._retry = handler
