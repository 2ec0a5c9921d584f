"""Several LBs behind one VIP: network namespaces, kernel ECMP and BGP (BIRD), for tests and the demo.

``topology`` builds and removes the namespaces and starts every process;
``bird`` renders the routers' and speakers' configurations; ``netns`` runs
code and commands inside a namespace; ``clients`` runs real QUIC clients in
the client namespace; ``scenarios`` holds the acceptance steps shared by
``tests/scaleout`` and ``quiclb demo-scaleout``.
"""
