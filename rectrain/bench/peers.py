"""Peers benchmark: the same DIN and data through a single-machine peer library.

The peer (``deepctr-torch`` DIN from PyPI) runs in the benchmark's own venv,
``benchmarks/.peer-venv``, created on first use with ``python3.11 -m venv`` and
``pip install torch==<rectrain's torch> deepctr-torch==0.3.0`` (pip takes torch from the local
CPU wheel when one is configured; otherwise set ``PIP_EXTRA_INDEX_URL`` to PyTorch's CPU index).
Both sides read the same prepared rows (train split to train, test split for AUC), with the
same ids, behaviour sequences, embedding size, attention and MLP sizes, epochs and global batch.
rectrain runs its full Ray Train path on 2 workers with the job's own recipe; its test AUC is that
of the best-validation epoch, the peer's that of its last epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rectrain.bench import report
from rectrain.bench.workloads import Workload

PEER_PACKAGES = ["deepctr-torch==0.3.0"]


def peer_venv(path: str) -> str:
    """Create (once) the peer venv at ``path``; returns its python. Raises RuntimeError with
    pip's output when the install fails."""
    import torch

    py = os.path.join(path, "bin", "python")
    stamp = os.path.join(path, ".rectrain-peer-" + "-".join(PEER_PACKAGES).replace("=", ""))
    if os.path.exists(stamp):
        return py
    if not os.path.exists(py):
        subprocess.run([sys.executable if sys.version_info[:2] == (3, 11) else "python3.11",
                        "-m", "venv", path], check=True)
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    p = subprocess.run([py, "-m", "pip", "install", "-q", torch_pin, *PEER_PACKAGES],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"peer venv {path}: pip install failed:\n{p.stdout}\n{p.stderr}")
    open(stamp, "w").close()
    return py


def _pad(col, maxlen: int) -> tuple[np.ndarray, np.ndarray]:
    """List column → (ids int64 [N, maxlen] left-aligned, zero-padded; lengths int64 [N])."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(lengths)
    row = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = pos < maxlen
    out = np.zeros((n, maxlen), dtype=np.int64)
    out[row[keep], pos[keep]] = values[keep]
    return out, np.minimum(lengths, maxlen).astype(np.int64)


def export_npz(wl: Workload, path: str) -> dict:
    """Write the workload's train/test rows for the peer (see :mod:`peer_deepctr`); returns
    the spec it carries."""
    from rectrain.bench.trainstep import _layout, bench_config

    cfg = bench_config(wl.job("/tmp/rectrain-bench-peers"))
    layout = _layout(cfg)
    m = cfg.model
    seq_names = {f.name for f in layout.sequence if f.kind == "sequence"}
    spec = {"embedding_dim": layout.embedding_dim, "mlp_hidden": list(m.mlp_hidden),
            "attention_hidden": list(m.attention_hidden), "dropout": m.dropout,
            "sparse": [], "multi_hot": [], "sequence": [], "history_features": [],
            "dense": [f.name for f in layout.dense]}
    arrays = {}
    maxlen_mh = {}
    for split in ("train", "test"):
        t = pq.read_table(os.path.join(wl.prepared_dir, split), columns=layout.columns)
        for f in layout.pooled + layout.sequence:
            col = t.column(f.name)
            vocab = layout.num_embeddings[f.table_name]
            if f.name in seq_names:
                ids, lens = _pad(col, layout.max_sequence_length)
                arrays[f"{split}__{f.name}"] = ids
                arrays[f"{split}__seq_length"] = lens
                if split == "train":
                    # deepctr names a history "hist_" + its query feature
                    spec["sequence"].append({"name": f.name, "table": f.table_name,
                                             "vocab": vocab,
                                             "maxlen": layout.max_sequence_length})
                    spec["history_features"].append(f.source)
            elif f.kind == "multi_hot":
                if split == "train":
                    maxlen_mh[f.name] = max(1, int(pc.max(pc.list_value_length(col)).as_py()
                                                   or 1))
                ids, _ = _pad(col, maxlen_mh[f.name])
                arrays[f"{split}__{f.name}"] = ids
                if split == "train":
                    spec["multi_hot"].append({"name": f.name, "table": f.table_name,
                                              "vocab": vocab, "maxlen": maxlen_mh[f.name],
                                              "pooling": f.pooling})
            else:
                arrays[f"{split}__{f.name}"] = col.to_numpy().astype(np.int64)
                if split == "train":
                    spec["sparse"].append({"name": f.name, "table": f.table_name,
                                           "vocab": vocab})
        for f in layout.dense:  # z-normalised with the manifest's train stats, as to_batch does
            st = layout.dense_stats.get(f.name, {"mean": 0.0, "std": 1.0})
            x = t.column(f.name).to_numpy(zero_copy_only=False).astype(np.float32)
            arrays[f"{split}__{f.name}"] = np.nan_to_num((x - st["mean"]) / (st["std"] or 1.0))
        arrays[f"{split}__label"] = t.column("label").to_numpy().astype(np.float32)
    # deepctr looks histories up as "hist_<query>": rename the sequence feature accordingly
    for s in spec["sequence"]:
        q = spec["history_features"][spec["sequence"].index(s)]
        new = f"hist_{q}"
        for split in ("train", "test"):
            arrays[f"{split}__{new}"] = arrays.pop(f"{split}__{s['name']}")
        s["name"] = new
    np.savez(path, spec=np.array(json.dumps(spec)), **arrays)
    return spec


def run_peers(wl: Workload, out_dir: str, venv: str, epochs: int = 2, batch: int = 1024,
              world: int = 2, progress=None) -> dict:
    """The peers job; writes ``peers.json``/``.md``/``.png``."""
    from rectrain.bench.trainstep import run_ray

    os.makedirs(out_dir, exist_ok=True)
    if progress:
        progress.set_description("peers: peer venv (deepctr-torch)")
    py = peer_venv(venv)
    data = os.path.join(out_dir, f"peer_{wl.name}.npz")
    export_npz(wl, data)
    if progress:
        progress.update(1)
        progress.set_description(f"peers: deepctr-torch DIN on {wl.name}")
    out = os.path.join(out_dir, f"peer_{wl.name}.json")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_deepctr.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([py, here, data, out, str(epochs), str(batch), str(os.cpu_count() or 1)],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"peer run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(out) as f:
        peer = json.load(f)
    if progress:
        progress.update(1)
        progress.set_description(f"peers: rectrain (Ray Train, {world} workers) on {wl.name}")
    job = wl.job(os.path.join(out_dir, "runs", f"peers_{wl.name}"), epochs=epochs,
                 batch_size=batch // world, num_workers=world)
    ours = run_ray(job)
    if progress:
        progress.update(1)
    rows = [
        {"system": f"deepctr-torch {peer.get('deepctr_torch', '')} DIN (1 process)",
         "samples_per_s": peer["samples_per_s"], "test_auc": peer["test_auc"],
         "epochs": epochs, "global_batch": batch},
        {"system": f"rectrain DIN (Ray Train, {world} workers, sharded)",
         "samples_per_s": ours["samples_per_s"], "test_auc": ours["test_auc"],
         "epochs": epochs, "global_batch": batch},
    ]
    md = (f"### Peers: DIN on {wl.name}, same rows and sizes\n\n"
          + report.markdown_table(rows, ["system", "epochs", "global_batch", "samples_per_s",
                                         "test_auc"], {"test_auc": ".4f"})
          + f"\n\nrectrain / peer samples/s: {ours['samples_per_s'] / peer['samples_per_s']:.2f}."
          " The peer's test AUC is after its last epoch; rectrain's is the best-validation "
          "epoch's (its job recipe: " + ("auxiliary heads, cosine lr" if wl.dataset else "BCE")
          + "). " + report.LOADED_NOTE + "\n")
    report.plot_bars(os.path.join(out_dir, "peers.png"), [r["system"][:28] for r in rows],
                     [r["samples_per_s"] for r in rows], "train samples/s",
                     f"DIN on {wl.name}: peer vs rectrain")
    result = {"workload": wl.name, "rows": rows, "peer": peer, "rectrain": ours,
              "rectrain_over_peer_samples_per_s": ours["samples_per_s"] / peer["samples_per_s"]}
    report.write(out_dir, "peers", result, md)
    return result
