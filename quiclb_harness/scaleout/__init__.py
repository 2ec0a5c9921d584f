"""Several LBs behind one VIP: network namespaces, kernel ECMP and BGP (BIRD), for tests and the demo.

``topology`` builds and removes the namespaces and starts every process;
``bird`` renders the router's and speakers' configurations; ``netns`` runs
code and commands inside a namespace; ``clients`` runs real QUIC clients in
the client namespace; ``scenarios`` measures each acceptance step;
``acceptance`` runs them in order (shared by ``tests/scaleout`` and the
demo); ``demo`` is ``quiclb demo-scaleout``.
"""
