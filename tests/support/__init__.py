"""Test support shared by the test modules (no test imports another test module's helpers).

- :mod:`tests.support.tiny`: the tiny synthetic job (config dicts, raw-log tables) with every
  feature kind.
- :mod:`tests.support.prepared`: hand-written prepared samples / folders for that job (no Ray).
- :mod:`tests.support.dist`: multi-process gloo jobs (:func:`~tests.support.dist.spawn`) and
  sharded-state helpers.
- :mod:`tests.support.ports`: :func:`~tests.support.ports.free_port`.
- :mod:`tests.support.ray_cluster`: a two-node loopback Ray cluster (session fixtures).
"""
