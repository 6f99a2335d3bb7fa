"""Storage helpers over fsspec: list Parquet inputs, read/write small files at any URL.

Every path in a job (raw logs, prepared samples, run folder with checkpoints and outputs) may be
a local path, ``file://``, ``s3://`` (through s3fs; endpoint and credentials from the usual AWS
environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, or
``~/.aws``), or any other fsspec protocol every Ray process can reach. ``memory://`` works for
one process only: :func:`require_shared` rejects it where Ray tasks or workers would read it.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

#: file names that data tools leave next to Parquet parts and that are not data
MARKER_SUFFIXES = (".crc",)


#: protocols whose files live in one process's memory: Ray tasks/workers cannot see them
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path inside it for ``url`` (local path, file://, s3://, ...).

    Listing caches of remote filesystems are dropped first: other processes (Ray tasks, other
    ranks) write to the same bucket, and a stale cached listing would hide their files."""
    fs, path = fsspec.core.url_to_fs(url)
    if not is_local(fs):
        fs.invalidate_cache()
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    proto = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in proto or "local" in proto


def require_shared(url: str, what: str) -> None:
    """Raise ``ValueError`` when ``url`` is on a process-local filesystem (``memory://``) that
    Ray tasks and Ray Train workers, running in other processes, cannot read or write."""
    fs, _ = fsspec.core.url_to_fs(url)
    proto = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if any(p in PROCESS_LOCAL_PROTOCOLS for p in proto):
        raise ValueError(
            f"{what} {url}: memory:// lives in one process's memory, but Ray tasks and Ray Train "
            f"workers run in other processes and cannot see it; use a local path, file:// or "
            f"shared storage such as s3://")


def ray_paths(urls: str | list[str]) -> tuple[str | list[str], pafs.FileSystem | None]:
    """``(paths, filesystem)`` for ``ray.data.read_parquet`` / ``Dataset.write_parquet``.

    Local paths go to Ray as they are (``filesystem=None``: Arrow's local filesystem). Any
    other URL is handed to Ray with its fsspec filesystem wrapped for Arrow
    (``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``), so Ray reads and writes with exactly the
    same endpoint and credentials as the rest of rectrain (Arrow's own S3 client would resolve
    them differently)."""
    single = isinstance(urls, str)
    lst = [urls] if single else list(urls)
    if not lst:
        return urls, None
    fs, _ = url_to_fs(lst[0])
    if is_local(fs):
        paths = [url_to_fs(u)[1] for u in lst]
        return (paths[0] if single else paths), None
    paths = [fs._strip_protocol(u) for u in lst]
    return (paths[0] if single else paths), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def arrow_fs(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for ``url`` (pyarrow's own for local, fsspec-wrapped else)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def absolute(path: str | None) -> str | None:
    """A local path made absolute in this process (Ray tasks and workers run in other
    directories); URLs (``s3://``, ``file://``) and None as they are."""
    return path if path is None or "://" in path else os.path.abspath(path)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/' (works for local paths and URLs)."""
    return posixpath.join(url.rstrip("/"), *parts)


def list_parquet_files(url: str) -> tuple[list[str], list[str]]:
    """Data files under ``url`` (a file or a folder, searched recursively, sorted).

    Returns ``(data_files, skipped)``: files whose name or any folder below ``url`` starts with
    ``_`` or ``.`` (``_SUCCESS``, ``.part.crc``, ``_temporary/``, ``.hive-staging/``) and ``*.crc``
    files are markers or unfinished output of other tools: listed, never read.

    Raises:
        FileNotFoundError: ``url`` does not exist or holds no data file.
    """
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or folder")
    if fs.isfile(path):
        return [fs.unstrip_protocol(path) if "://" in url else path], []
    files, markers = [], []
    root = path.rstrip("/")
    for p in sorted(fs.find(path)):
        parts = posixpath.relpath(p, root).split("/")
        full = fs.unstrip_protocol(p) if "://" in url else p
        if any(x.startswith(("_", ".")) for x in parts) or parts[-1].endswith(MARKER_SUFFIXES):
            markers.append(full)
        else:
            files.append(full)
    if not files:
        raise FileNotFoundError(f"{url}: folder holds no data files (markers: {markers})")
    return files, markers


def read_parquet(url: str, columns: list[str] | None = None, use_threads: bool = True
                 ) -> pa.Table:
    """Read one Parquet file at any fsspec URL into an Arrow table (``use_threads``: decode
    columns on pyarrow's thread pool).

    Raises:
        ValueError: the file is not valid Parquet (message names the file).
    """
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns, use_threads=use_threads)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{url}: cannot read as Parquet: {e}") from None


def write_parquet(table: pa.Table, url: str) -> None:
    """Write ``table`` as one Parquet file at ``url`` (parent folders created)."""
    fs, path = url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def write_json(obj: Any, url: str) -> None:
    """Write ``obj`` as indented JSON at ``url``."""
    fs, path = url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)


def read_json(url: str) -> Any:
    """Read JSON from ``url``."""
    fs, path = url_to_fs(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def remove(url: str) -> None:
    """Delete ``url`` recursively when it exists."""
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str, dst: str) -> None:
    """Rename ``src`` (a file or folder) to ``dst``, replacing a file there; on a local
    filesystem an atomic ``os.replace``, on object stores a copy then delete."""
    fs, s = url_to_fs(src)
    _, d = url_to_fs(dst)
    if is_local(fs):
        os.replace(s, d)
    elif fs.isfile(s):  # object stores have no rename: copy each object, then delete
        fs.copy(s, d)
        fs.rm(s)
    else:  # a prefix: object by object (fsspec's recursive mv mis-nests or misses prefixes)
        s = s.rstrip("/")
        for f in fs.find(s):
            fs.copy(f, d.rstrip("/") + f[len(s):])
        fs.rm(s, recursive=True)


def replace_folder(tmp: str, url: str) -> None:
    """Put the finished folder ``tmp`` at ``url``: the old ``url`` (if any) is renamed aside,
    ``tmp`` renamed in, then the old one deleted, so ``url`` holds either the old or the new
    files, never a mix."""
    old = url.rstrip("/") + ".old"
    remove(old)
    if exists(url):
        move(url, old)
    move(tmp, url)
    remove(old)


def file_sizes(files: list[str]) -> list[int]:
    """Size in bytes of each file in ``files`` (URLs or paths as :func:`list_parquet_files`
    returns them): one listing of their common folder where the filesystem gives sizes with
    it (a ``find`` with details: one request per 1,000 keys on S3), else one stat per file."""
    if not files:
        return []
    fs, first = url_to_fs(files[0])
    paths = [fs._strip_protocol(f) for f in files]
    root = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(first)
    try:
        info = fs.find(root, detail=True)
        return [int(info[p]["size"]) for p in paths]
    except (KeyError, OSError, TypeError):
        return [int(fs.size(p)) for p in paths]
