"""Inner-product top-n search over item vectors: exact (blockwise torch matmul, the reference)
and approximate (faiss IVF or HNSW), behind one interface.

Every index answers ``search(queries float32 [q, d], n) -> (scores float32 [q, n], ids int64
[q, n])``: the ``n`` largest inner products ``<query, item>`` per query, best first, with item
*rows* (0-based positions in the ``vectors`` the index was built from). Where an approximate
index finds fewer than ``n`` items, the missing slots hold id ``-1`` and score ``-inf``.

Sources: faiss ``IndexIVFFlat`` (inverted file over a k-means coarse quantizer; Jégou et al.,
"Product quantization for nearest neighbor search", TPAMI 2011) and ``IndexHNSWFlat``
(Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
Hierarchical Navigable Small World graphs", TPAMI 2018), both with ``METRIC_INNER_PRODUCT``
(https://github.com/facebookresearch/faiss/wiki).
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch


class Index(Protocol):
    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...


class ExactIndex:
    """Exact top-n by blockwise matmul: ``queries @ V[block].T`` for ``items_per_block`` items
    at a time, merged into a running top-n, so memory is ``q x (items_per_block + n)`` floats,
    never ``q x n_items``. Ties go to the lower item row (as ``torch.topk`` on the whole row)."""

    def __init__(self, vectors: np.ndarray, items_per_block: int = 65536):
        self.v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.block = int(items_per_block)

    @property
    def ntotal(self) -> int:
        return self.v.shape[0]

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        n = min(int(n), self.ntotal)
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
        with torch.no_grad():
            for lo in range(0, self.ntotal, self.block):
                s = q @ self.v[lo:lo + self.block].t()
                top = torch.topk(s, k=min(n, s.shape[1]), dim=1)
                cat_s = torch.cat([best_s, top.values], 1)
                cat_i = torch.cat([best_i, top.indices + lo], 1)
                # stable sort of the merged candidates keeps the lower row first on ties
                order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :n]
                best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        return best_s.numpy(), best_i.numpy()


class FaissIndex:
    """A faiss inner-product index (``ivf``: ``IndexIVFFlat`` with ``nlist`` lists, ``nprobe``
    probed per query; ``hnsw``: ``IndexHNSWFlat`` with ``M`` links per node and ``efSearch``
    candidates per query, raised to ``n`` where smaller since HNSW returns at most efSearch).

    Raises:
        ImportError: faiss-cpu is not installed.
    """

    def __init__(self, vectors: np.ndarray, kind: Literal["ivf", "hnsw"], nlist: int = 100,
                 nprobe: int = 10, m: int = 32, ef_search: int = 128, ef_construction: int = 200,
                 threads: int | None = None):
        import faiss

        if threads:
            faiss.omp_set_num_threads(int(threads))
        # built on one OpenMP thread unless ``threads`` is given: HNSW's graph (and IVF's
        # k-means) depend on the order of parallel inserts, and every run, resumed blocks
        # included, must get the same index; searching uses all threads (per query, exact)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(int(threads or 1))
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        d = v.shape[1]
        self.kind, self.ntotal = kind, v.shape[0]
        if kind == "ivf":
            nlist = max(1, min(int(nlist), v.shape[0]))
            self.quantizer = faiss.IndexFlatIP(d)  # kept alive: the IVF index references it
            self.index = faiss.IndexIVFFlat(self.quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(v)
            self.index.nprobe = min(int(nprobe), nlist)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = int(ef_construction)
            self.ef_search = int(ef_search)
        else:
            raise ValueError(f"index kind {kind!r}: expected ivf or hnsw")
        self.threads = threads
        self.index.add(v)
        faiss.omp_set_num_threads(int(threads) if threads else before)

    def __getstate__(self) -> dict:
        """Picklable (``ray.put`` to the actors): the faiss index as its
        ``faiss.serialize_index`` bytes (uint8), the same structure, so searches are equal."""
        import faiss

        state = {k: v for k, v in self.__dict__.items() if k not in ("index", "quantizer")}
        return {**state, "index": faiss.serialize_index(self.index)}

    def __setstate__(self, state: dict) -> None:
        import faiss

        if state.get("threads"):
            faiss.omp_set_num_threads(int(state["threads"]))
        self.__dict__.update({**state, "index": faiss.deserialize_index(state["index"])})

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(int(n), self.ntotal)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, n)
        s, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
        s = np.where(i < 0, -np.inf, s).astype(np.float32)
        return s, i.astype(np.int64)


def build_index(vectors: np.ndarray, kind: str = "exact", **params) -> Index:
    """The index ``kind`` (``exact``, ``ivf``, ``hnsw``) over ``vectors`` float32 ``[n_items,
    d]``; ``params`` as :class:`ExactIndex` / :class:`FaissIndex` take them (unknown names for
    the kind are ignored, so one ``recommend.index_params`` mapping serves every kind)."""
    if kind == "exact":
        return ExactIndex(vectors, **{k: v for k, v in params.items() if k == "items_per_block"})
    keep = {"ivf": ("nlist", "nprobe", "threads"),
            "hnsw": ("m", "ef_search", "ef_construction", "threads")}.get(kind)
    if keep is None:
        raise ValueError(f"index kind {kind!r}: expected exact, ivf or hnsw")
    return FaissIndex(vectors, kind, **{k: v for k, v in params.items() if k in keep})
