"""Atomic torch.distributed.checkpoint (DCP) save/load of a sharded model and its optimisers,
at any fsspec URL.

Layout of a checkpoint folder: DCP's ``.metadata`` and ``__<rank>_<n>.distcp`` shard files
(tensors only: model state incl. ShardedTensors, and the optimiser *state* tensors: the fused
sparse optimiser's per-table state such as row-wise Adagrad ``momentum1``, and the dense
optimiser's ``exp_avg``/``exp_avg_sq``/``step``) plus ``meta.json`` (epoch, step, data position,
metrics, sharding plan as text, job config; JSON only).

Atomicity: a save writes the shards to ``<url>.tmp``, renames it to ``<url>`` once every rank has
finished, and only then writes ``meta.json``, the commit marker. A folder without ``meta.json``
is never loaded (:func:`is_complete`), so a crash at any point of a save (even on object stores
where a rename is a copy) never leaves a checkpoint that looks complete.

Growth (``load_checkpoint(..., grow={table: (old_rows, new_rows)})``): a warm start on data
whose ``vocab`` tables grew loads the checkpoint's rows into the larger tables with
:class:`GrowLoadPlanner`; rows past the saved ones keep the destination's fresh values.

Storage: plain paths use DCP's ``FileSystemWriter``/``FileSystemReader``; any URL with a scheme
(``file://``, ``s3://``, ``gs://``, ``memory://`` in one process, ...) uses DCP's
``FsspecWriter``/``FsspecReader``.

No arbitrary unpickling on load: tensors come from DCP's byte storage (``torch.load`` with
``weights_only=True`` inside DCP), ``meta.json`` is JSON, and DCP's pickled ``.metadata`` index
is read with a restricted unpickler that only admits DCP's metadata classes, torch sizes and
dtypes (:class:`SafeUnpickler`); any other global raises ``pickle.UnpicklingError``.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import (CheckpointException, DefaultLoadPlanner,
                                          FileSystemReader, FileSystemWriter)
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from rectrain.data import storage

META = "meta.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _optim_tensors(optimizer) -> dict:
    return {"state": optimizer.state_dict()["state"]} if optimizer is not None else {}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for DCP's ``.metadata`` index admitting only DCP's own metadata dataclasses,
    ``torch.Size``, torch dtypes/layouts/memory formats and a few builtins (paths, ordered
    dicts). Anything else raises ``pickle.UnpicklingError`` naming the global."""

    _MODULES = ("torch.distributed.checkpoint.",)
    _ALLOWED: ClassVar[set] = {("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch._utils", "_get_layout"),
                ("torch.serialization", "_get_layout"),
                ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or module.startswith(self._MODULES):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     f"DCP index never holds; refusing to load it")


class _SafeMetadata:
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = SafeUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP ``FileSystemReader`` whose ``.metadata`` is read with :class:`SafeUnpickler`."""


class GrowLoadPlanner(DefaultLoadPlanner):
    """DCP ``DefaultLoadPlanner`` that also loads a saved tensor into a destination with more
    rows (dim 0), for the tables named in ``grow`` (``{table: (old_rows, new_rows)}``).

    DCP's read plan is the overlap of the saved chunks with this rank's destination chunks
    (``create_read_items_for_chunk_list``, for any sharding: table-wise, row-wise, another
    world size); the default planner only refuses a size difference first. Here a tensor of a
    grown table (its key holds TorchRec's ``embedding_bags.<table>.weight`` or
    ``embeddings.<table>.weight``: the weights and the fused optimiser's per-row state such as
    ``...item.weight.item.momentum1``) saved with ``old_rows`` rows is planned as if saved at
    ``new_rows``: only rows ``0..old_rows-1`` exist in the saved chunks, so only they are read,
    and rows ``old_rows..new_rows-1`` keep the destination's values (the fresh table's init,
    the optimiser's initial state). Any other size difference raises ``ValueError`` naming the
    key and both sizes (``checkpoint``: the URL, for the message).
    """

    def __init__(self, grow: dict[str, tuple[int, int]], checkpoint: str = ""):
        super().__init__()
        self.grow = {t: (int(a), int(b)) for t, (a, b) in grow.items()}
        self.checkpoint = checkpoint
        #: keys loaded into larger destinations by the last plan
        self.grown_keys: list[str] = []

    def _table(self, fqn: str, saved: torch.Size) -> str | None:
        return next((t for t, (old, _) in self.grow.items()
                     if re.search(rf"\bembedding(_bag)?s\.{re.escape(t)}\.weight\b", fqn)
                     and len(saved) and saved[0] == old), None)

    def create_local_plan(self):
        # by the saved metadata, not this rank's state dict: DCP plans a rank that holds no
        # shard of a table from the unflattened state dict, which still holds its key
        saved = self.metadata.state_dict_metadata
        md = dict(saved)
        for fqn, m in saved.items():
            if isinstance(m, TensorStorageMetadata) and (t := self._table(fqn, m.size)):
                md[fqn] = TensorStorageMetadata(
                    m.properties, torch.Size([self.grow[t][1], *m.size[1:]]), m.chunks)
        self.grown_keys = sorted(k for k in md if md[k] is not saved[k])
        for fqn, obj in self.state_dict.items():
            m = md.get(fqn)
            if isinstance(m, TensorStorageMetadata) and hasattr(obj, "size") \
                    and m.size != obj.size():
                raise ValueError(f"{self.checkpoint}: {fqn} has size {tuple(saved[fqn].size)} "
                                 f"in the checkpoint and {tuple(obj.size())} now, which is no "
                                 f"growth of a table in {sorted(self.grow)}")
        self.metadata.state_dict_metadata = md  # this rank's planner copy only
        try:
            return super().create_local_plan()
        finally:
            self.metadata.state_dict_metadata = saved


def _writer(url: str):
    if "://" in url:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        return FsspecWriter(url)
    return FileSystemWriter(url)


def _reader(url: str):
    if "://" in url:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        class SafeFsspecReader(_SafeMetadata, FsspecReader):
            pass
        return SafeFsspecReader(url)
    return SafeFileSystemReader(url)


def is_complete(url: str) -> bool:
    """``True`` when ``url`` holds a committed checkpoint (its ``meta.json`` marker exists)."""
    return storage.exists(storage.join(url, META))


def _init_lazy_state(optimizer) -> None:
    """Dense optimisers (Adam, ...) create their state at the first step; DCP loads in place into
    the tensors that exist, so create them first (TorchRec ``KeyedOptimizer.init_state``: one
    step with zero gradients; the parameters are overwritten by the checkpoint afterwards)."""
    parts = [o for _, o in optimizer.optimizers] if hasattr(optimizer, "optimizers") \
        else [optimizer]
    for o in parts:
        if hasattr(o, "init_state") and hasattr(o, "params") and len(o.state) < len(o.params):
            o.init_state()
            o.zero_grad()


def save_checkpoint(url: str, model: nn.Module, optimizer=None, meta: dict | None = None) -> None:
    """Collective: every rank calls it. Writes model (+ optimiser state) shards to ``url.tmp``,
    renames that to ``url`` and then writes ``meta.json`` (the commit marker) on rank 0."""
    url = url.rstrip("/")
    tmp = url + ".tmp"
    if _rank() == 0:
        storage.remove(tmp)
    _barrier()
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = _optim_tensors(optimizer)
    dcp.save(state, storage_writer=_writer(tmp))
    _barrier()
    if _rank() == 0:
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
        storage.write_json(meta or {}, storage.join(url, META))
    _barrier()


def load_checkpoint(url: str, model: nn.Module, optimizer=None,
                    grow: dict[str, tuple[int, int]] | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``'s
    state) in place, sharded or unsharded: DCP reshards to whatever layout the current state
    dict has (another world size, another sharding plan, or one unsharded process). ``grow``
    (``{table: (old_rows, new_rows)}``, from :func:`rectrain.data.schema.grown_tables`): those
    tables are larger now; their saved rows and per-row optimiser state load into rows
    ``0..old_rows-1``, the rest stay as initialised (:class:`GrowLoadPlanner`). Returns the
    ``meta.json`` dict.

    Raises:
        FileNotFoundError: no complete checkpoint at ``url``.
        pickle.UnpicklingError: the DCP index refers to anything but DCP metadata classes.
        ValueError: a tensor's saved size differs from the current one other than by the
            growth in ``grow`` (names the key and both sizes).
    """
    url = url.rstrip("/")
    if not is_complete(url):
        raise FileNotFoundError(f"{url}: no complete checkpoint (meta.json missing)")
    fs, path = storage.url_to_fs(storage.join(url, ".metadata"))
    with fs.open(path, "rb") as f:  # fail here, with a plain error, before DCP's collectives
        SafeUnpickler(io.BytesIO(f.read())).load()
    if optimizer is not None:
        _init_lazy_state(optimizer)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = _optim_tensors(optimizer)
    from rectrain.models.zch import WORLD_LOCAL_KEYS
    # zch: a shard's output segments describe this world size; the saved ones another's
    keep = {k: v for k, v in state["model"].items() if k.endswith(WORLD_LOCAL_KEYS)}
    for k in keep:
        del state["model"][k]
    try:
        dcp.load(state, storage_reader=_reader(url),
                 planner=GrowLoadPlanner(grow, url) if grow else None)
    except CheckpointException as e:  # the planner's own error, not DCP's per-rank wrapper
        errs = [exc for exc, _ in e.failures.values() if isinstance(exc, ValueError)]
        if grow and errs:
            raise errs[0] from None
        raise
    state["model"].update(keep)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        sd = optimizer.state_dict()
        sd["state"] = state["optim"]["state"]
        optimizer.load_state_dict(sd)
    # zch tables: ids routed by world size, so a load at another one re-deals them
    from rectrain.models.zch import redistribute
    redistribute(model, optimizer)
    return storage.read_json(storage.join(url, META))
