"""Model registry: config name -> class. Models take ``(layout, spec, sparse_device,
dense_device)``, embed a :class:`~rectrain.data.features.Batch` with
:class:`~rectrain.models.sparse_arch.SparseArch` and follow the output contracts of
:mod:`rectrain.models.base` (ranking logits ``[B]`` / ``[B, 1 + K]``; retrieval ``(u, v)``);
:func:`task_of` tells the two apart."""

from __future__ import annotations

from torch import nn

from rectrain.models.base import RANKING
from rectrain.models.din import DIN
from rectrain.models.hstu import HSTU
from rectrain.models.sasrec import SASRec
from rectrain.models.two_tower import TwoTower
from rectrain.models.zoo import BST, DLRM, AutoInt, DCNv2

MODELS = {"din": DIN, "dlrm": DLRM, "dcnv2": DCNv2, "bst": BST, "autoint": AutoInt,
          "two_tower": TwoTower, "sasrec": SASRec, "hstu": HSTU}


def build_model(layout, spec, sparse_device=None, dense_device=None):
    """Instantiate the model named ``spec.name`` (KeyError lists the known names)."""
    try:
        cls = MODELS[spec.name]
    except KeyError:
        raise KeyError(f"model.name {spec.name!r} unknown; known: {sorted(MODELS)}") from None
    return cls(layout, spec, sparse_device=sparse_device, dense_device=dense_device)


def task_of(model) -> str:
    """``"ranking"`` or ``"retrieval"`` of a model, a model class, a wrapper holding the model
    as ``.module`` (DistributedModelParallel, DDP) or a ``model.name`` of the registry.

    Raises:
        KeyError: an unknown model name (lists the known ones).
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise KeyError(f"model.name {model!r} unknown; known: {sorted(MODELS)}")
        model = MODELS[model]
    while not hasattr(model, "task") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "task", RANKING)
