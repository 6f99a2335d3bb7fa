"""Serving a trained run (one process, unsharded model): :mod:`rectrain.serve.recommend` (top-k
items per user) and :mod:`rectrain.serve.export` (a ``torch.export`` artifact).

Layering: serve imports :mod:`rectrain.models`, :mod:`rectrain.data`, :mod:`rectrain.config` and
:mod:`rectrain.checkpoint` only, never ``rectrain.train``.
"""
