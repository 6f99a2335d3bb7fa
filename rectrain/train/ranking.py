"""The ranking task: CTR and rating models (din, dlrm, dcnv2, bst, autoint).

Loss: BCE on the label (or MSE on ``label_value`` with ``model.loss: mse``) plus
``model.aux_weight`` x BCE of the auxiliary ordinal heads (:func:`rectrain.train.pipeline.
loss_of`). Evaluation scores every row of the
split (collective, each row once, see :func:`rectrain.data.loader.padded_eval_tables`); metrics
per :mod:`rectrain.train.objectives` (AUC, logloss, NE; RMSE/MAE for mse; GAUC on test).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rectrain.data.features import Batch, FeatureLayout
from rectrain.data.loader import padded_eval_tables
from rectrain.data.schema import ITEM, TS, USER
from rectrain.models.base import main_logits
from rectrain.train.metrics import gather_arrays
from rectrain.train.objectives import (eval_metrics, init_regression_head, is_regression,
                                       main_loss, selection_score, test_extras)
from rectrain.train.pipeline import loss_of


def evaluate(model, layout: FeatureLayout, source, batch_size: int, device,
             keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Score every row of this rank's shard; collective over ranks (same step count everywhere,
    short ranks run padding rows that are discarded). Returns arrays concatenated over ALL ranks:
    ``logits`` float32 ``[N]`` (the label head), ``labels`` ``[N]`` and each column in
    ``keep``."""
    model.eval()
    out: dict[str, list] = {"logits": [], "labels": [], **{k: [] for k in keep}}
    with torch.no_grad():
        for t, n_real, _ in padded_eval_tables(source, layout, batch_size, keep, out):
            batch = layout.to_batch(t).to(device)
            logits = main_logits(model(batch))[:n_real]
            out["logits"].append(logits.float().cpu().numpy())
            out["labels"].append(batch.labels[:n_real].cpu().numpy())
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}
    model.train()
    return gather_arrays(arrays)


class RankingTask:
    """:class:`~rectrain.train.task.Task` for models returning logits ``[B]`` / ``[B, 1+K]``."""

    def __init__(self, cfg, layout: FeatureLayout, manifest: dict, model, env):
        self.cfg, self.layout, self.env = cfg, layout, env
        self.label_loss = main_loss(cfg)
        self.aux_weight = cfg.model.aux_weight
        self.regression = is_regression(cfg)
        self._init_head = False

    def to_batch(self, table: pa.Table) -> Batch:
        return self.layout.to_batch(table.select(self.layout.columns))

    def start(self, step: int) -> None:
        # an MSE head starts at the first batch's mean label, only on a fresh run
        self._init_head = self.regression and step == 0

    def loss(self, model, batch: Batch) -> torch.Tensor:
        if self._init_head:
            init_regression_head(model, batch.labels)
            self._init_head = False
        return loss_of(model(batch), batch, self.aux_weight, self.label_loss)

    def _evaluate(self, model, source, keep=()):
        tc = self.cfg.train
        return evaluate(model, self.layout, source, tc.eval_batch_size, self.env.device, keep)

    def validate(self, model, source) -> dict:
        return eval_metrics(self.cfg, self._evaluate(model, source))

    def selection_score(self, vm: dict) -> float:
        return selection_score(self.cfg, vm)

    def epoch_record(self, vm: dict) -> dict:
        rec = {"valid_auc": vm["auc"], "valid_logloss": vm["logloss"], "valid_rows": vm["rows"]}
        if self.regression:
            rec.update(valid_rmse=vm["rmse"], valid_mae=vm["mae"])
        return rec

    def describe(self, vm: dict) -> str:
        text = f"valid AUC {vm['auc']:.4f} logloss {vm['logloss']:.4f} ({vm['rows']} rows)"
        text += f" [{vm['undefined']}]" if "undefined" in vm else ""
        return text + (f" RMSE {vm['rmse']:.4f}" if self.regression else "")

    def scalars(self, vm: dict) -> dict[str, float]:
        return {"valid/auc": vm["auc"], "valid/logloss": vm["logloss"]}

    def test(self, model, source, best_valid: dict) -> tuple[dict, pa.Table, str]:
        te = self._evaluate(model, source, keep=(USER, ITEM, TS))
        tm = eval_metrics(self.cfg, te)
        metrics = {"test_auc": tm["auc"], "test_logloss": tm["logloss"], "test_ne": tm["ne"],
                   "test_rows": tm["rows"], "best_valid_auc": best_valid.get("auc", np.nan)}
        metrics.update(test_extras(self.cfg, te, te[USER]))
        text = f"AUC {tm['auc']:.4f} logloss {tm['logloss']:.4f} NE {tm['ne']:.4f} " \
               f"({tm['rows']} rows)"
        if "undefined" in tm:
            metrics["test_undefined"] = tm["undefined"]
            text += f" [{tm['undefined']}]"
        logits = te["logits"].astype(np.float64)
        if self.regression:  # the predicted label value (e.g. the rating), not a probability
            score = logits
            text += f" RMSE {metrics['test_rmse']:.4f} MAE {metrics['test_mae']:.4f}"
        else:
            score = 1.0 / (1.0 + np.exp(-logits))
        pred = pa.table({"user_id": te[USER], "item_id": te[ITEM], "timestamp": te[TS],
                         "label": te["labels"].astype(np.float32), "score": score})
        return metrics, pred, text
