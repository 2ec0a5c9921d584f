"""aioquic backends that issue QUIC-LB routable connection IDs and sit behind the quiclb LB.

Modules: ``routable_cids`` (the CID hook; the only module naming aioquic
privates), ``server`` (decapsulation, reply shim, counters, reload),
``apps`` (echo ALPN and HTTP/3), ``tls``, ``dsr`` (direct server return),
``settings``, ``stats``, ``metrics``, ``cli`` (``quiclb-backend``),
``client`` (the test/demo QUIC client) and ``testing`` (loopback relay and stack).
"""
