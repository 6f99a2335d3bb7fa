"""Model registry: config name -> class. Models take ``(layout, spec, sparse_device,
dense_device)`` and map a :class:`~rectrain.data.features.Batch` to logits ``[B]``."""

from __future__ import annotations

from rectrain.models.din import DIN

MODELS = {"din": DIN}

from rectrain.models.sasrec import SASRec  # noqa: E402  (retrieval / next-item models)
from rectrain.models.two_tower import TwoTower  # noqa: E402

MODELS["two_tower"] = TwoTower
MODELS["sasrec"] = SASRec


def build_model(layout, spec, sparse_device=None, dense_device=None):
    """Instantiate the model named ``spec.name`` (KeyError lists the known names)."""
    try:
        cls = MODELS[spec.name]
    except KeyError:
        raise KeyError(f"model.name {spec.name!r} unknown; known: {sorted(MODELS)}") from None
    return cls(layout, spec, sparse_device=sparse_device, dense_device=dense_device)
