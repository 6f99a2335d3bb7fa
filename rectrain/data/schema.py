"""The prepared-sample contract shared by prepare (which writes it), the trainer and serving
(which read it): meta column names, split names and the manifest file.

A prepared folder holds ``train/``, ``valid/``, ``test/`` Parquet samples (one row per event:
the feature columns of the job plus the meta columns below), ``catalog/{users,items}.parquet``
and ``manifest.json`` (schema, table sizes, rows per split, rejected rows by reason).
"""

from __future__ import annotations

from rectrain.data import storage

SPLITS = ("train", "valid", "test")
# meta columns carried in every sample next to the features
USER, ITEM, TS, POS, LABEL, SPLIT = "_user", "_item", "_ts", "_pos", "label", "_split"
LABEL_VALUE = "label_value"  # the raw label column as float32 (e.g. the rating)


def load_manifest(prepared_dir: str) -> dict:
    """Read ``manifest.json`` from a prepared folder.

    Raises:
        FileNotFoundError: the folder has no ``manifest.json`` (the message names the folder).
    """
    url = storage.join(prepared_dir, "manifest.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"{prepared_dir}: no manifest.json; run `rectrain prepare` first")
    return storage.read_json(url)
