"""Why an item was recommended: the user's past items that explain it.

- :func:`explain_attention` (DIN, BST: models with ``forward_with_attention``): the ``m``
  history items with the largest attention weights for that (user, item) row (unnormalised
  activation weights as in the DIN paper, Zhou et al. KDD 2018; larger = more influence).
- :func:`explain_nearest` (retrieval stage): the ``m`` history items whose retrieval-model item
  vectors have the largest cosine with the recommended item's vector.

Both add ``explain_item_ids`` (list<int64>, raw item ids) and ``explain_weights``
(list<float32>, decreasing) to the lists table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rectrain.data.schema import ITEM
from rectrain.serve.context import _key_rows, _padded


def _append(table: pa.Table, hist_raw: np.ndarray, w: np.ndarray, valid: np.ndarray,
            m: int) -> pa.Table:
    """``hist_raw`` int64 ``[n, L]`` raw ids, ``w`` float ``[n, L]``, ``valid`` bool ``[n, L]``:
    the ``m`` largest valid weights per row."""
    w = np.where(valid, w, -np.inf)
    top = np.argsort(-w, axis=1, kind="stable")[:, :m]
    ok = np.take_along_axis(valid, top, 1)
    n = ok.sum(1)
    offsets = pa.array(np.r_[0, np.cumsum(n)].astype(np.int32))
    ids = pa.array(np.take_along_axis(hist_raw, top, 1)[ok].astype(np.int64))
    ws = pa.array(np.take_along_axis(w, top, 1)[ok].astype(np.float32))
    table = table.append_column("explain_item_ids", pa.ListArray.from_arrays(offsets, ids))
    return table.append_column("explain_weights", pa.ListArray.from_arrays(offsets, ws))


def _history(ctx, u: np.ndarray) -> tuple[np.ndarray, str]:
    """``[n, L]`` encoded ids (-1 padded) of the first behaviour sequence of user rows ``u``
    and the name of its source feature."""
    seq_name = ctx.cfg.model.sequence_features[0]
    source = next(f.source for f in ctx.cfg.features if f.name == seq_name)
    return _padded(ctx.state[seq_name].take(pa.array(u)), ctx.cfg.dataset.sequence_length), source


def _raw_of(ctx, source: str) -> np.ndarray:
    """Encoded item id (feature ``source``) -> raw item id (0 where unknown)."""
    col = ctx.items[source].to_numpy()
    raw_of = np.zeros(int(col.max(initial=0)) + 1, dtype=np.int64)
    raw_of[col] = ctx.items[ITEM].to_numpy()
    return raw_of


def explain_attention(table: pa.Table, u: np.ndarray, i: np.ndarray, ctx, m: int,
                      rows_per_chunk: int = 65536) -> pa.Table:
    """Attention explanation of rows (user row ``u``, item row ``i``) of ``ctx``'s model.

    Raises:
        ValueError: the model has no attention.
    """
    model = ctx.model
    if not hasattr(model, "forward_with_attention"):
        raise ValueError(f"model {ctx.cfg.model.name!r} has no attention to explain")
    hist, source = _history(ctx, u)
    with torch.no_grad():
        w = [model.forward_with_attention(ctx.batch(u[a:a + rows_per_chunk],
                                                    i[a:a + rows_per_chunk]))[1]
             for a in range(0, len(u), rows_per_chunk)]
    w = torch.cat(w).numpy() if w else np.zeros((0, hist.shape[1]), np.float32)
    raw = _raw_of(ctx, source)[np.maximum(hist, 0)]
    return _append(table, raw, w, hist >= 0, m)


def explain_nearest(table: pa.Table, u: np.ndarray, i: np.ndarray, rank_ctx, retr_ctx,
                    item_vectors: torch.Tensor, m: int) -> pa.Table:
    """Nearest-past-items explanation: cosine between the recommended item's and each history
    item's vector (``item_vectors`` float ``[n_items of retr_ctx, d]``); rows as in
    :func:`explain_attention`, history from the retrieval run's latest state."""
    ru = _key_rows(rank_ctx.user_keys.take(pa.array(u)), retr_ctx.user_keys)
    ri = _key_rows(rank_ctx.item_keys.take(pa.array(i)), retr_ctx.item_keys)
    hist, source = _history(retr_ctx, np.maximum(ru, 0))
    raw = _raw_of(retr_ctx, source)[np.maximum(hist, 0)]
    hrow = _key_rows(pa.array(raw.reshape(-1)), retr_ctx.item_keys).reshape(raw.shape)
    valid = (hist >= 0) & (hrow >= 0) & (ru >= 0)[:, None] & (ri >= 0)[:, None]
    v = torch.nn.functional.normalize(item_vectors.float(), dim=1).numpy()
    w = np.einsum("nd,nld->nl", v[np.maximum(ri, 0)], v[np.maximum(hrow, 0)])
    return _append(table, raw, w, valid, m)
