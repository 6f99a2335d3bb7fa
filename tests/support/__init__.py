"""Test support shared by the test modules (no test imports another test module's helpers).

- :mod:`tests.support.tiny`: the tiny synthetic job (config dicts, raw-log tables) with every
  feature kind.
- :mod:`tests.support.prepared`: hand-written prepared samples / folders for that job (no Ray).
- :mod:`tests.support.dist`: multi-process gloo jobs (:func:`~tests.support.dist.spawn`, and
  :func:`~tests.support.dist.in_process` for one rank) and sharded-state helpers.
- :mod:`tests.support.ports`: :func:`~tests.support.ports.free_port`.
- :mod:`tests.support.ray_cluster`: a two-node loopback Ray cluster (session fixtures).
- :mod:`tests.support.s3`: the S3 endpoint the session's local Ray (``ray_local``) is started
  with, for tests/test_s3_roundtrip.py.
- :mod:`tests.support.run_dirs`: a run folder as an earlier run left it (run outputs, a file
  of the user's) and the checks that a new run replaced it.
"""
