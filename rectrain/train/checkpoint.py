"""Atomic torch.distributed.checkpoint (DCP) save/load of a sharded model and its optimisers.

Layout of a checkpoint folder: DCP's ``.metadata`` and ``__<rank>_<n>.distcp`` shard files
(tensors only: model state incl. ShardedTensors, and the optimiser *state* tensors) plus
``meta.json`` (epoch, step, metrics, sharding plan as text, job config). Loading never unpickles:
DCP reads tensors, ``meta.json`` is JSON. A save goes to ``<url>.tmp`` and is renamed to ``<url>``
only after every rank finished writing, so a crash mid-save never leaves a folder that looks
complete.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from rectrain.data import storage


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _optim_tensors(optimizer) -> dict:
    return {"state": optimizer.state_dict()["state"]} if optimizer is not None else {}


def save_checkpoint(url: str, model: nn.Module, optimizer=None, meta: dict | None = None) -> None:
    """Collective: every rank calls it. Writes model (+ optimiser state) shards and ``meta.json``
    to ``url`` atomically (write to ``url.tmp``, then rename)."""
    tmp = url.rstrip("/") + ".tmp"
    if _rank() == 0:
        storage.remove(tmp)
    _barrier()
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = _optim_tensors(optimizer)
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:
        storage.write_json(meta or {}, storage.join(tmp, "meta.json"))
        fs, path = storage.url_to_fs(url)
        _, tmp_path = storage.url_to_fs(tmp)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        if storage.is_local(fs):
            fs.mv(tmp_path, path, recursive=True)
        else:  # object stores have no folder rename (s3fs's recursive mv fails on the prefix)
            for f in fs.find(tmp_path):
                fs.mv(f, path.rstrip("/") + f[len(tmp_path.rstrip("/")):])
            if fs.exists(tmp_path):
                fs.rm(tmp_path, recursive=True)
    _barrier()


def load_checkpoint(url: str, model: nn.Module, optimizer=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` in place (sharded
    or unsharded: DCP reshards to whatever the current state dict's layout is). Returns the
    ``meta.json`` dict.

    Raises:
        FileNotFoundError: no complete checkpoint at ``url``.
    """
    if not storage.exists(storage.join(url, "meta.json")):
        raise FileNotFoundError(f"{url}: no complete checkpoint (meta.json missing)")
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = _optim_tensors(optimizer)
    dcp.load(state, checkpoint_id=url)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        sd = optimizer.state_dict()
        sd["state"] = state["optim"]["state"]
        optimizer.load_state_dict(sd)
    return storage.read_json(storage.join(url, "meta.json"))
