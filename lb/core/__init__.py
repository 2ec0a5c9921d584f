"""The sans-IO core of quiclb.

Rules, in the spirit of h11's ``_state.py``:

1. Nothing under ``lb.core`` opens a socket, starts a timer, reads the clock or
   logs on the hot path. Time, when it matters, arrives as ``now: float``.
2. Functions that read network bytes end in ``_untrusted`` and may only raise
   :class:`lb.errors.MalformedDatagram`.
3. Tables (CID configurations, backends, the Maglev ring) are immutable values
   built off the hot path; the datapath only reads them.

Modules: ``cid_config`` (validated QUIC-LB parameters), ``cid_encoder`` /
``cid_decoder`` (the codec, draft-ietf-quic-load-balancers-21), ``cid_issuer``
(server-side nonce management), ``quic_header`` (RFC 8999 invariants),
``encapsulation`` (PROXY protocol v2), ``maglev`` (keyed consistent hash),
``router`` (the routing decision).
"""
