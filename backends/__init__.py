"""aioquic backends that issue QUIC-LB routable connection IDs and sit behind the quiclb LB.

Modules: ``routable_cids`` (the CID hook; the only module naming aioquic
privates), ``server`` (decapsulation, reply shim, counters, reload),
``apps`` (echo ALPN and HTTP/3), ``tls``, ``dsr`` (direct server return),
``settings``, ``stats``, ``metrics``, ``cli`` (``quiclb-backend``) and
``client`` (the test/demo QUIC client). From ``lb`` they import only the shared
wire and address kit (``lb.core``'s codec, header, encapsulation, constants and
addresses) and ``lb.errors``, plus ``lb.control.config`` in ``cli`` and
``settings``, which read the deployment's one configuration file
(``tests/test_import_direction.py`` holds this). The loopback test stack
lives in ``quiclb_harness.loopback_stack``.
"""
