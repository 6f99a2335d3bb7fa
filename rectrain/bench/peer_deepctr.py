"""Peer run: DIN from deepctr-torch (PyPI ``deepctr-torch``), single process.

Runs inside the benchmark's own venv (``benchmarks/.peer-venv``: torch + deepctr-torch +
scikit-learn only; no rectrain import). Input: an ``.npz`` written by
:func:`rectrain.bench.peers.export_npz` (same rows, same encoded ids, same behaviour sequences
as rectrain's prepared samples). Output: JSON with train samples/s and test AUC/logloss.

usage: python peer_deepctr.py DATA.npz OUT.json EPOCHS BATCH THREADS
"""

import json
import sys
import time

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score


def _offline_requests() -> None:
    """deepctr-torch asks PyPI for its latest version when imported (``requests.get`` in a
    thread); the benchmark runs offline, so give it a ``requests`` whose ``get`` fails at once
    (deepctr then prints a notice and goes on)."""
    import types

    mod = types.ModuleType("requests")

    def get(*a, **k):
        raise ConnectionError("rectrain bench: no network at run time")

    mod.get = get
    mod.codes = types.SimpleNamespace(ok=200)
    sys.modules.setdefault("requests", mod)


def main(data_path: str, out_path: str, epochs: int, batch: int, threads: int) -> None:
    _offline_requests()
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = np.load(data_path, allow_pickle=False)
    spec = json.loads(str(d["spec"]))
    E = spec["embedding_dim"]
    cols = []
    for f in spec["sparse"]:
        cols.append(SparseFeat(f["name"], f["vocab"], embedding_dim=E,
                               embedding_name=f["table"]))
    for f in spec["multi_hot"]:
        cols.append(VarLenSparseFeat(SparseFeat(f["name"], f["vocab"], embedding_dim=E,
                                                embedding_name=f["table"]),
                                     maxlen=f["maxlen"], combiner=f["pooling"]))
    for f in spec["sequence"]:  # deepctr's naming: the history of feature X is "hist_X"
        cols.append(VarLenSparseFeat(SparseFeat(f["name"], f["vocab"], embedding_dim=E,
                                                embedding_name=f["table"]),
                                     maxlen=f["maxlen"], length_name="seq_length"))

    for f in spec["dense"]:
        cols.append(DenseFeat(f, 1))

    def inputs(split):
        x = {f: d[f"{split}__{f}"] for f in spec["dense"]}
        for f in spec["sparse"] + spec["multi_hot"] + spec["sequence"]:
            x[f["name"]] = d[f"{split}__{f['name']}"]
        x["seq_length"] = d[f"{split}__seq_length"]
        return x, d[f"{split}__label"]

    xtr, ytr = inputs("train")
    xte, yte = inputs("test")
    model = DIN(cols, spec["history_features"], dnn_hidden_units=spec["mlp_hidden"],
                att_hidden_size=spec["attention_hidden"], dnn_activation="prelu",
                att_activation="Dice", dnn_dropout=spec["dropout"], device="cpu", seed=0)
    model.compile("adam", "binary_crossentropy")
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=batch, epochs=epochs, verbose=0, shuffle=True)
    train_s = time.perf_counter() - t0
    p = model.predict(xte, batch_size=8192).reshape(-1)
    out = {"peer": "deepctr-torch DIN", "epochs": epochs, "batch": batch, "threads": threads,
           "train_rows": int(len(ytr)), "train_seconds": train_s,
           "samples_per_s": len(ytr) * epochs / train_s,
           "test_rows": int(len(yte)), "test_auc": float(roc_auc_score(yte, p)),
           "test_logloss": float(log_loss(yte, np.clip(p, 1e-7, 1 - 1e-7))),
           "torch": torch.__version__}
    try:
        from importlib.metadata import version
        out["deepctr_torch"] = version("deepctr-torch")
    except Exception:  # noqa: BLE001
        pass
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))
