"""Load a training run's model for serving: one process, unsharded (DCP gathers the table
shards of a sharded checkpoint), eval mode. The sharded form is
:func:`rectrain.serve.sharded.load_sharded`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rectrain.checkpoint import is_complete, load_checkpoint
from rectrain.config import JobConfig, config_from_dict
from rectrain.data import storage
from rectrain.data.features import FeatureLayout
from rectrain.data.schema import check_same_data, load_manifest
from rectrain.models import build_model


@dataclass
class LoadedModel:
    """A checkpoint's model with what serving needs around it.

    Attributes:
        model: the unsharded model in eval mode (tables on CPU).
        layout: the job's feature layout (from the prepared data's manifest).
        cfg: the job config stored in the checkpoint's ``meta.json``.
        meta: the checkpoint's metadata (``epoch``, ``config``, ...) plus ``url``, the
            checkpoint folder it was read from.
    """

    model: nn.Module
    layout: FeatureLayout
    cfg: JobConfig
    meta: dict


def checkpoint_url(path: str) -> str:
    """``path`` itself when it is a complete checkpoint folder (e.g. ``RUN_DIR/checkpoints/
    step-N``), else the run directory's best checkpoint ``path/checkpoint``.

    Raises:
        FileNotFoundError: neither holds a complete checkpoint (``meta.json``).
    """
    if is_complete(path):
        return path
    url = storage.join(path, "checkpoint")
    if is_complete(url):
        return url
    raise FileNotFoundError(f"{path}: no complete checkpoint, neither a checkpoint folder nor a "
                            f"run directory with one (expected {url}/meta.json)")


def read_run(path: str) -> tuple[str, JobConfig, dict]:
    """``(checkpoint url, stored job config, manifest)`` of the run at ``path`` (see
    :func:`checkpoint_url`), no model built.

    Raises:
        FileNotFoundError: no complete checkpoint there, or the run's prepared data is gone.
        ValueError: the prepared data changed since the checkpoint (manifest fingerprint).
    """
    url = checkpoint_url(path)
    saved, cfg = stored_config(url)
    manifest = load_manifest(cfg.prepared_dir)
    check_tables(cfg, manifest)
    check_same_data(saved.get("data"), manifest, url, cfg.prepared_dir)
    return url, cfg, manifest


def stored_config(url: str) -> tuple[dict, JobConfig]:
    """``(meta, job config)`` stored in the checkpoint folder ``url``'s ``meta.json``.

    Raises:
        ValueError: the meta holds no ``config`` mapping, or the stored config is invalid
            (:class:`~rectrain.config.ConfigError`); both name ``url/meta.json``.
    """
    meta_url = storage.join(url, "meta.json")
    saved = storage.read_json(meta_url)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{meta_url}: config: missing or not a mapping (the job config the "
                         f"checkpoint was trained with); not a checkpoint written by rectrain "
                         f"train, or a damaged one")
    return saved, config_from_dict(saved["config"], source=f"{meta_url} (stored config)")


def check_tables(cfg: JobConfig, manifest: dict) -> None:
    """Every embedding table of ``cfg``'s features has a row count >= 1 in the manifest's
    ``tables`` (what :class:`FeatureLayout` sizes the tables from), so a hand-edited or
    truncated manifest stops here, not in TorchRec's table configs.

    Raises:
        ValueError: naming ``prepared_dir/manifest.json``, ``tables.<table>`` and the value.
    """
    url = storage.join(cfg.prepared_dir, "manifest.json")
    tables = manifest.get("tables") if isinstance(manifest, dict) else None
    if not isinstance(tables, dict):
        raise ValueError(f"{url}: tables: missing or not a mapping (got {tables!r}): the "
                         f"table sizes; prepare the data again")
    for f in cfg.features:
        if f.kind in ("dense", "text_embedding", "match"):
            continue
        name = f.table_name
        if name not in tables:
            raise ValueError(f"{url}: tables.{name}: missing (the table of feature {f.name!r}; "
                             f"the manifest has {sorted(tables)}); prepare the data again")
        v = tables[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{url}: tables.{name}: {v!r} is not a row count (an integer >= "
                             f"1); prepare the data again")


def load_model(path: str) -> LoadedModel:
    """The model of the checkpoint at ``path`` (see :func:`checkpoint_url`), unsharded.

    Raises:
        FileNotFoundError: no complete checkpoint there, or the run's prepared data is gone.
        ValueError: the prepared data changed since the checkpoint (manifest fingerprint).
    """
    url, cfg, manifest = read_run(path)
    layout = FeatureLayout(cfg, manifest)
    layout.table_dtype = "fp32"  # unsharded nn.EmbeddingBag would return fp16 to fp32 layers
    model = build_model(layout, cfg.model)
    meta = load_checkpoint(url, model)
    model.eval()
    return LoadedModel(model=model, layout=layout, cfg=cfg, meta={**meta, "url": url})
