"""Training objective and evaluation metrics per ``model.loss`` (``bce`` or ``mse``).

- ``bce``: binary cross-entropy on the label; metrics AUC, logloss, NE (and GAUC on test).
- ``mse``: squared error on the raw label value (``label_value``, e.g. the MovieLens rating);
  metrics RMSE and MAE, plus the AUC of the predicted value against the binary label
  (``label_value >= dataset.label.threshold``), so a regression model can be compared with the
  classifiers on the same ranking metric. Model selection uses validation RMSE (lower is better).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rectrain.config import JobConfig
from rectrain.train.metrics import auc, binary_metrics, gauc, regression_metrics


def is_regression(cfg: JobConfig) -> bool:
    return cfg.model.loss == "mse"


def main_loss(cfg: JobConfig) -> nn.Module:
    """The loss on the label head (column 0): ``BCEWithLogitsLoss`` or ``MSELoss``."""
    return nn.MSELoss() if is_regression(cfg) else nn.BCEWithLogitsLoss()


def init_regression_head(model: nn.Module, targets: torch.Tensor) -> float:
    """Set the label head's bias to the global mean of ``targets`` (float32 ``[B]``, all-reduced
    over ranks so every replica gets the same value), so an MSE model starts at the mean rating
    instead of 0 (Adam at lr 1e-3 would need thousands of steps to move a bias to 3.5).

    ``model`` is the model or its DMP wrapper; the parameter named ``...head.bias`` is the
    label head's bias (every zoo model and DIN call their last layer ``head``). Returns the
    value set.

    Raises:
        ValueError: the model has no ``head.bias`` parameter.
    """
    t = torch.tensor([float(targets.sum()), float(targets.numel())], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    mean = float(t[0] / t[1].clamp(min=1))
    bias = [p for n, p in model.named_parameters() if n == "head.bias" or n.endswith(".head.bias")]
    if not bias:
        raise ValueError(f"{type(model).__name__}: no head.bias parameter; model.loss: mse "
                         f"needs the label head to be named `head`")
    with torch.no_grad():
        bias[0][0] = mean
    return mean


def eval_metrics(cfg: JobConfig, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics of one evaluation (``arrays``: ``logits``, ``labels`` over all ranks). Always has
    ``auc``, ``logloss`` (NaN for mse), ``rows``; mse adds ``rmse``, ``mae``."""
    out, labels = arrays["logits"], arrays["labels"]
    if not is_regression(cfg):
        return binary_metrics(out, labels)
    m = regression_metrics(out, labels)
    thr = cfg.dataset.label.threshold
    binary = (labels >= thr).astype(np.float64) if thr is not None else labels
    return {"auc": auc(out, binary), "logloss": float("nan"), "ne": float("nan"), **m}


def selection_score(cfg: JobConfig, vm: dict) -> float:
    """Higher is better: validation AUC (bce) or minus validation RMSE (mse); NaN ranks below
    any real value."""
    v = -vm["rmse"] if is_regression(cfg) else vm["auc"]
    return v if v == v else -1e30


def test_extras(cfg: JobConfig, arrays: dict[str, np.ndarray], users: np.ndarray) -> dict:
    """Extra test metrics for ``metrics.json``: ``test_gauc`` (+ users counted/skipped) for both
    losses (by the binary label), and ``test_rmse``/``test_mae`` for mse."""
    out, labels = arrays["logits"], arrays["labels"]
    extra = {}
    if is_regression(cfg):
        m = regression_metrics(out, labels)
        extra.update(test_rmse=m["rmse"], test_mae=m["mae"])
        thr = cfg.dataset.label.threshold
        labels = (labels >= thr).astype(np.float64) if thr is not None else labels
    g = gauc(out, labels, users)
    extra.update(test_gauc=g["gauc"], test_gauc_users=g["users"],
                 test_gauc_users_skipped=g["users_skipped"])
    return extra
