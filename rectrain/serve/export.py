"""Export a training run's model as unsharded ``torch.export`` artifacts for serving.

``rectrain export --checkpoint RUN_DIR --out DIR`` loads the run's best checkpoint (or any
checkpoint folder) into an unsharded model in one process (DCP gathers the table shards), wraps
it in a module that takes plain tensors instead of a ``KeyedJaggedTensor``
(:class:`ServingModel` for ranking models, :class:`TowerModel` for each tower of a retrieval
model) and writes:

- ranking models (din, dlrm, dcnv2, bst, autoint): ``DIR/model.pt2``;
- retrieval models (two_tower): ``DIR/user.pt2`` (the user / query tower) and
  ``DIR/item.pt2`` (the item tower); the score of a (user, item) pair is
  ``<u, v> / temperature`` (``temperature`` in ``serving.json``), so a serving system indexes
  the item vectors once and looks the user vector up among them (nearest neighbours). SASRec's
  user tower (and the ranking models built on ``nn.MultiheadAttention``, bst and autoint) do
  not export today: torch.export specialises the attention's batch size, and export refuses
  with an error naming the model;
- ``DIR/serving.json``: the input contract (sparse keys in order, dense feature names and
  their normalisation, sequence length), the output of each program, the checkpoint it came
  from, and the job config.

Each program is ``torch.export.save`` of its wrapper (``torch.export.export``, non-strict,
dynamic batch size and number of ids). Load it in a plain PyTorch process (no Ray, no
``torchrec.distributed``) with ``torch.export.load(path).module()``; the graph calls FBGEMM's
jagged-tensor operators, so ``import fbgemm_gpu`` first (they are registered on import).

Input format of every program (``B`` rows, ``F`` sparse keys in ``sparse_keys`` order):

- ``dense``: float32 ``[B, D]`` raw dense features in ``dense_features`` order (z-normalised
  inside with the training statistics; NaN counts as the mean), ``D`` may be 0;
- ``values``: int64 ``[N]`` encoded ids (the prepared samples' ids, i.e. after the vocabularies),
  key-major: all ids of key 0 for rows 0..B-1, then key 1, ...;
- ``lengths``: int64 ``[F * B]``: the number of ids of each (key, row), key-major, 1 for a
  one-id feature, 0..L for a behaviour sequence (most recent last).

The item tower reads only the item's keys (``model.item_feature`` and ``model.item_features``),
the user tower only the others; give the unused keys length 0 (the item feature length 1).

Output: ranking, float32 ``[B]``: the predicted probability of the label (sigmoid of the label
head's logit) for ``model.loss: bce``, the predicted label value (e.g. the rating, no sigmoid)
for ``model.loss: mse``; retrieval, float32 ``[B, d]`` user or item vectors.
This is exactly KeyedJaggedTensor's own ``(values, lengths)`` layout, so
``Batch.sparse.values()`` / ``.lengths()`` from :meth:`FeatureLayout.to_batch` feed it directly.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rectrain.data import storage
from rectrain.data.features import Batch, FeatureLayout
from rectrain.models import task_of
from rectrain.models.base import RETRIEVAL, label_prediction
from rectrain.serve.loading import load_model


class _PlainInputs(nn.Module):
    """Plain tensors ``(dense [B, D], values [N], lengths [F*B])`` -> a :class:`Batch`, with
    the training statistics' z-normalisation of the dense features."""

    def __init__(self, model: nn.Module, layout: FeatureLayout):
        super().__init__()
        self.model = model
        self.keys = list(layout.sparse_keys)
        stats = [layout.dense_stats.get(f.name, {"mean": 0.0, "std": 1.0}) for f in layout.dense]
        self.register_buffer("mean", torch.tensor([s["mean"] for s in stats], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([s["std"] or 1.0 for s in stats],
                                                 dtype=torch.float32))

    def batch(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> Batch:
        x = torch.nan_to_num((dense - self.mean) / self.std, nan=0.0)
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths.int())
        n = dense.shape[0]
        return Batch(dense=x, sparse=kjt, labels=torch.zeros(n), aux_labels=torch.zeros(n, 0))


class ServingModel(_PlainInputs):
    """Plain-tensor front of a ranking model: ``forward(dense [B, D] float32, values [N] int64,
    lengths [F*B] int64) -> [B] float32``, the probability (bce) or the predicted label value
    (mse; see the module docstring)."""

    def __init__(self, model: nn.Module, layout: FeatureLayout):
        super().__init__(model, layout)
        self.regression = layout.regression

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        return label_prediction(self.model(self.batch(dense, values, lengths)), self.regression)


class TowerModel(_PlainInputs):
    """Plain-tensor front of one tower of a retrieval model: ``forward(dense, values, lengths)
    -> [B, d] float32`` user vectors (``tower="user"``) or item vectors (``tower="item"``)."""

    def __init__(self, model: nn.Module, layout: FeatureLayout, tower: str):
        super().__init__(model, layout)
        if tower not in ("user", "item"):
            raise ValueError(f"tower must be 'user' or 'item', got {tower!r}")
        if tower == "user" and layout.step_times:
            raise ValueError("model.time_bias: the exported user tower takes (dense, values, "
                             "lengths) only, not the event times the time bias reads; export a "
                             "model trained with time_bias: false")
        self.tower = tower

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        batch = self.batch(dense, values, lengths)
        if self.tower == "user":
            return self.model(batch)[0]
        return self.model(batch, n_queries=0)[1]  # the user side runs on no row


def load_serving_model(checkpoint: str) -> tuple[ServingModel, FeatureLayout, dict]:
    """The unsharded ranking model of ``checkpoint`` (a run directory: its best
    ``checkpoint/``, or a checkpoint folder such as ``RUN_DIR/checkpoints/step-N``) in eval
    mode, wrapped.

    Raises:
        FileNotFoundError: no complete checkpoint there, or the run's prepared data is gone.
        ValueError: a retrieval model (no single score per row; see :func:`export`).
    """
    loaded = load_model(checkpoint)
    if task_of(loaded.model) == RETRIEVAL:
        raise ValueError(f"model {loaded.cfg.model.name!r} is a retrieval model: it has no "
                         f"single score per row; export it as two towers (rectrain export)")
    return ServingModel(loaded.model, loaded.layout).eval(), loaded.layout, loaded.meta


def example_inputs(layout: FeatureLayout, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """Valid inputs for tracing: ``batch`` rows, every id 1, sequences of length 2."""
    lengths = []
    for f in layout.pooled + layout.sequence:
        lengths.append(torch.full((batch,), 2 if f.kind in ("multi_hot", "sequence") else 1))
    lengths = torch.cat(lengths).long()
    return (torch.zeros(batch, len(layout.dense)), torch.ones(int(lengths.sum()),
                                                              dtype=torch.long), lengths)


def _export_program(wrapper: nn.Module, layout: FeatureLayout, path: str, name: str) -> None:
    """``torch.export`` ``wrapper`` with a dynamic batch size and number of ids to ``path``.

    Raises:
        ValueError: torch.export cannot capture the model (names the model), or ``out`` is
            a folder with other files than an earlier export's.
    """
    from torch.export import Dim
    from torch.fx.experimental import _config as fx_config

    b, n = Dim("batch", min=1), Dim("ids", min=1)
    shapes = {"dense": {0: b}, "values": {0: n}, "lengths": {0: len(layout.sparse_keys) * b}}
    # size-oblivious: do not specialise the batch size to >= 2 (a batch of 1 must work too)
    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(wrapper.eval(), example_inputs(layout),
                                     dynamic_shapes=shapes, strict=False)
    except Exception as e:  # e.g. nn.MultiheadAttention guards the batch size to != 1
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name!r}: cannot export {os.path.basename(path)}: "
                           f"torch.export could not capture it with a dynamic batch size "
                           f"({first})") from e
    torch.export.save(ep, path)


_INPUTS = {"dense": "float32 [B, D], raw values in dense_features order",
           "values": "int64 [N], encoded ids, key-major in sparse_keys order",
           "lengths": "int64 [F*B], ids per (key, row), key-major"}


def export(checkpoint: str, out: str) -> list[str]:
    """Write the serving programs and ``out/serving.json`` for ``checkpoint``; returns the
    paths of the programs: ``[out/model.pt2]`` for a ranking model, ``[out/user.pt2,
    out/item.pt2]`` for a retrieval model. ``out`` is a local folder (``torch.export.save``
    writes a zip file).

    Raises:
        FileNotFoundError: no complete checkpoint at ``checkpoint`` (see
            :func:`~rectrain.serve.loading.load_model`), or the run's prepared data is gone.
        ValueError: torch.export cannot capture the model (names the model), or ``out`` is
            a folder with other files than an earlier export's.
    """
    final = out.rstrip("/")
    if os.path.isdir(final) and os.listdir(final) and \
            not os.path.exists(os.path.join(final, "serving.json")):
        raise ValueError(f"--out {out}: the folder exists and is not an export (no serving.json); "
                         f"choose an empty or new folder, export replaces the whole folder")
    loaded = load_model(checkpoint)
    model, layout, meta, name = loaded.model, loaded.layout, loaded.meta, loaded.cfg.model.name
    # written into a sibling folder and swapped in when complete: a failed export keeps the
    # previous one, and no file of an earlier export is left beside the new ones
    out = f"{final}.tmp-{os.getpid()}"
    storage.remove(out)
    os.makedirs(out)
    if task_of(model) == RETRIEVAL:
        programs = {"user": TowerModel(model, layout, "user"),
                    "item": TowerModel(model, layout, "item")}
        outputs = {"user": "float32 [B, d], user (query) vectors",
                   "item": "float32 [B, d], item vectors",
                   "score": "<user, item> / temperature"}
        extra = {"task": RETRIEVAL, "temperature": float(model.temperature),
                 "item_feature": model.item_key, "programs": {k: f"{k}.pt2" for k in programs}}
    else:
        programs = {"model": ServingModel(model, layout)}
        outputs = ("float32 [B], predicted label value (model.loss: mse)" if layout.regression
                   else "float32 [B], probability of the label")
        extra = {"task": task_of(model), "programs": {"model": "model.pt2"}}
    paths = []
    for key, wrapper in programs.items():
        path = os.path.join(out, f"{key}.pt2")
        _export_program(wrapper, layout, path, name)
        paths.append(path)
    storage.write_json({
        "format": "torch.export", "model": name, **extra, "inputs": _INPUTS, "output": outputs,
        "sparse_keys": layout.sparse_keys, "dense_features": [f.name for f in layout.dense],
        "sequence_length": layout.max_sequence_length, "checkpoint": meta["url"],
        "epoch": meta.get("epoch"), "config": meta.get("config")},
        os.path.join(out, "serving.json"))
    storage.replace_folder(out, final)
    return [os.path.join(final, os.path.basename(p)) for p in paths]
