"""Test and demo harness for quiclb: datagram builders, deployments, process clusters, ``quiclb demo``.

Shared by ``tests/``, ``bench/`` and the demo. It may import ``lb`` and
``backends``; neither of them imports it (``tests/test_import_direction.py``).
"""
