"""Export a training run's model as one unsharded ``torch.export`` artifact for serving.

``rectrain export --checkpoint RUN_DIR --out DIR`` loads the run's best checkpoint (or any
checkpoint folder) into an unsharded model in one process (DCP gathers the table shards), wraps
it in :class:`ServingModel`, which takes plain tensors instead of a ``KeyedJaggedTensor``, and
writes:

- ``DIR/model.pt2``: ``torch.export.save`` of the wrapper (``torch.export.export``, non-strict,
  dynamic batch size and number of ids). Load it in a plain PyTorch process (no Ray, no
  ``torchrec.distributed``) with ``torch.export.load(path).module()``; the graph calls FBGEMM's
  jagged-tensor operators, so ``import fbgemm_gpu`` first (they are registered on import).
- ``DIR/serving.json``: the input contract (sparse keys in order, dense feature names and
  their normalisation, sequence length), the checkpoint it came from, and the job config.

Input format of :class:`ServingModel` (``B`` rows, ``F`` sparse keys in ``sparse_keys`` order):

- ``dense``: float32 ``[B, D]`` raw dense features in ``dense_features`` order (z-normalised
  inside with the training statistics; NaN counts as the mean), ``D`` may be 0;
- ``values``: int64 ``[N]`` encoded ids (the prepared samples' ids, i.e. after the vocabularies),
  key-major: all ids of key 0 for rows 0..B-1, then key 1, ...;
- ``lengths``: int64 ``[F * B]``: the number of ids of each (key, row), key-major, 1 for a
  one-id feature, 0..L for a behaviour sequence (most recent last).

Output: float32 ``[B]`` predicted probability of the label (sigmoid of the label head's logit).
This is exactly KeyedJaggedTensor's own ``(values, lengths)`` layout, so
``Batch.sparse.values()`` / ``.lengths()`` from :meth:`FeatureLayout.to_batch` feed it directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rectrain.config import config_from_dict
from rectrain.data import storage
from rectrain.data.features import Batch, FeatureLayout
from rectrain.data.schema import load_manifest
from rectrain.models import build_model
from rectrain.models.base import main_logits
from rectrain.checkpoint import is_complete, load_checkpoint


class ServingModel(nn.Module):
    """Plain-tensor front of a trained model: ``forward(dense [B, D] float32, values [N] int64,
    lengths [F*B] int64) -> probabilities [B] float32`` (see the module docstring)."""

    def __init__(self, model: nn.Module, layout: FeatureLayout):
        super().__init__()
        self.model = model
        self.keys = list(layout.sparse_keys)
        stats = [layout.dense_stats.get(f.name, {"mean": 0.0, "std": 1.0}) for f in layout.dense]
        self.register_buffer("mean", torch.tensor([s["mean"] for s in stats], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([s["std"] or 1.0 for s in stats],
                                                 dtype=torch.float32))

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num((dense - self.mean) / self.std, nan=0.0)
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths.int())
        n = dense.shape[0]
        batch = Batch(dense=x, sparse=kjt, labels=torch.zeros(n), aux_labels=torch.zeros(n, 0))
        return torch.sigmoid(main_logits(self.model(batch)))


def _checkpoint_url(path: str) -> str:
    if is_complete(path):
        return path
    url = storage.join(path, "checkpoint")
    if is_complete(url):
        return url
    raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run directory with "
                            f"one (expected {url}/meta.json)")


def load_serving_model(checkpoint: str) -> tuple[ServingModel, FeatureLayout, dict]:
    """The unsharded model of ``checkpoint`` (a run directory: its best ``checkpoint/``, or a
    checkpoint folder such as ``RUN_DIR/checkpoints/step-N``) in eval mode, wrapped.

    Raises:
        FileNotFoundError: no complete checkpoint there, or the run's prepared data is gone.
    """
    url = _checkpoint_url(checkpoint)
    cfg = config_from_dict(storage.read_json(storage.join(url, "meta.json"))["config"])
    layout = FeatureLayout(cfg, load_manifest(cfg.prepared_dir))
    model = build_model(layout, cfg.model)
    meta = load_checkpoint(url, model)
    model.eval()
    return ServingModel(model, layout).eval(), layout, {**meta, "url": url}


def example_inputs(layout: FeatureLayout, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """Valid inputs for tracing: ``batch`` rows, every id 1, sequences of length 2."""
    lengths = []
    for f in layout.pooled + layout.sequence:
        lengths.append(torch.full((batch,), 2 if f.kind in ("multi_hot", "sequence") else 1))
    lengths = torch.cat(lengths).long()
    return (torch.zeros(batch, len(layout.dense)), torch.ones(int(lengths.sum()),
                                                              dtype=torch.long), lengths)


def export(checkpoint: str, out: str) -> str:
    """Write ``out/model.pt2`` and ``out/serving.json`` for ``checkpoint``; returns the
    ``model.pt2`` path. ``out`` is a local folder (``torch.export.save`` writes a zip file).

    Raises:
        FileNotFoundError: see :func:`load_serving_model`.
    """
    import os

    from torch.export import Dim

    wrapper, layout, meta = load_serving_model(checkpoint)
    args = example_inputs(layout)
    b, n = Dim("batch", min=1), Dim("ids", min=1)
    shapes = {"dense": {0: b}, "values": {0: n}, "lengths": {0: len(layout.sparse_keys) * b}}
    # size-oblivious: do not specialise the batch size to >= 2 (a batch of 1 must work too)
    from torch.fx.experimental import _config as fx_config
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        ep = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.pt2")
    torch.export.save(ep, path)
    storage.write_json({
        "format": "torch.export", "inputs": {
            "dense": "float32 [B, D], raw values in dense_features order",
            "values": "int64 [N], encoded ids, key-major in sparse_keys order",
            "lengths": "int64 [F*B], ids per (key, row), key-major"},
        "output": "float32 [B], probability of the label",
        "sparse_keys": layout.sparse_keys, "dense_features": [f.name for f in layout.dense],
        "sequence_length": layout.max_sequence_length, "checkpoint": meta["url"],
        "epoch": meta.get("epoch"), "config": meta.get("config")},
        os.path.join(out, "serving.json"))
    return path
