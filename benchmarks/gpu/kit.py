"""Offline wheel kit in parts, for a node with no network that takes at most ~64 MiB per command.

Standard library only (it runs on the bare node before anything is installed).

Format (``pack``): every wheel is rewritten with its members *stored* (ZIP_STORED; same names,
order, timestamps and contents, so pip installs it exactly as the original), the stored wheels
are concatenated into one raw stream, the stream is cut into ``chunk`` MiB pieces each compressed
on its own as an ``.xz`` stream (LZMA; CUDA fat binaries shrink ~3-4x more than the wheel's own
deflate, and independent chunks decompress in parallel on the node's cores), and the compressed
stream is cut into parts of at most ``part`` MiB. Layout of the kit folder::

    manifest.json                      kit_id, wheels, chunks, parts (sha256 of each)
    parts/p01/kit.p01 + manifest.json  one folder per remote command (its ``carry`` path)
    parts/p02/...

On the node (``receive``, ``install``): each command copies the part it carried to ``DEST``
(``/tmp/rectrain-kit``) and records it in ``DEST/MARKER.json``; a part other than p01 is only
accepted when the marker holds the same ``kit_id`` and every earlier part, so a node that lost
``/tmp`` between two commands is detected (exit 3: start over from p01). ``install`` checks the
sha256 of every part, the compressed stream, each chunk and each reassembled wheel, then runs
``pip install --no-index --no-deps --target``.

Exit codes: 0 ok, 2 usage/manifest error, 3 kit lost or incomplete (start over), 4 checksum
mismatch (a transfer corrupted a part: resend it), 5 pip failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor

MIB = 2**20
KIT_LOST, BAD_SUM, PIP_FAILED = 3, 4, 5
MARKER = "MARKER.json"


class KitError(Exception):
    """A kit failure with its exit code (``code``) and a message naming the file."""

    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code = code


def sha256_file(path: str, lo: int = 0, n: int | None = None) -> str:
    """sha256 hex of ``path`` (or of ``n`` bytes from offset ``lo``), read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(lo)
        left = n
        while left is None or left > 0:
            b = f.read(8 * MIB if left is None else min(8 * MIB, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def store_wheel(src: str, dst: str) -> None:
    """Rewrite wheel ``src`` as ``dst`` with every member ZIP_STORED (names, order, dates, modes
    kept; the RECORD hashes are of contents, so it stays valid)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr, out.create_system = info.external_attr, info.create_system
            out.compress_type = zipfile.ZIP_STORED
            with zin.open(info) as r, zout.open(out, "w", force_zip64=True) as w:
                shutil.copyfileobj(r, w, 8 * MIB)


def _compress(args: tuple) -> bytes:
    path, lo, n, preset = args
    with open(path, "rb") as f:
        f.seek(lo)
        return lzma.compress(f.read(n), preset=preset)


def _decompress(args: tuple) -> tuple[int, str]:
    stream, clo, cn, raw, rlo, rn, want = args
    with open(stream, "rb") as f:
        f.seek(clo)
        data = lzma.decompress(f.read(cn))
    got = hashlib.sha256(data).hexdigest()
    if len(data) != rn or got != want:
        return rlo, f"chunk at raw offset {rlo}: {len(data)} bytes, sha256 {got}, want {rn} {want}"
    fd = os.open(raw, os.O_WRONLY)
    try:
        os.pwrite(fd, data, rlo)
    finally:
        os.close(fd)
    return rlo, ""


def pack(wheels: list[str], out: str, part_mib: float = 60, chunk_mib: int = 32,
         preset: int = 6, jobs: int | None = None) -> dict:
    """Build the kit from ``wheels`` into folder ``out`` (replaced); returns the manifest.

    Raises:
        ValueError: no wheels, a duplicate wheel name, or ``part_mib`` not positive.
    """
    if not wheels:
        raise ValueError("pack: no wheels given")
    names = [os.path.basename(w) for w in wheels]
    if len(set(names)) != len(names):
        raise ValueError(f"pack: duplicate wheel names in {names}")
    if part_mib <= 0:
        raise ValueError(f"pack: part size {part_mib} MiB must be positive")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "parts"))
    tmp = tempfile.mkdtemp(prefix="kit-", dir=out)
    raw = os.path.join(tmp, "raw")
    man: dict = {"format": 1, "wheels": [], "chunks": [], "parts": []}
    with open(raw, "wb") as fraw:
        for w in sorted(wheels, key=os.path.basename):
            st = os.path.join(tmp, os.path.basename(w))
            store_wheel(w, st)
            lo = fraw.tell()
            with open(st, "rb") as f:
                shutil.copyfileobj(f, fraw, 8 * MIB)
            man["wheels"].append({"name": os.path.basename(w), "sha256": sha256_file(w),
                                  "size": os.path.getsize(w), "stored_sha256": sha256_file(st),
                                  "offset": lo, "stored_size": os.path.getsize(st)})
            os.remove(st)
    total = os.path.getsize(raw)
    step = chunk_mib * MIB
    spans = [(lo, min(step, total - lo)) for lo in range(0, total, step)]
    stream = os.path.join(tmp, "stream")
    with open(stream, "wb") as fs, ProcessPoolExecutor(jobs or os.cpu_count() or 1) as ex:
        for (lo, n), data in zip(spans, ex.map(_compress, [(raw, lo, n, preset)
                                                           for lo, n in spans])):
            man["chunks"].append({"raw_offset": lo, "raw_size": n,
                                  "raw_sha256": sha256_file(raw, lo, n),
                                  "offset": fs.tell(), "size": len(data)})
            fs.write(data)
    os.remove(raw)
    man["raw_size"] = total
    man["stream_size"] = os.path.getsize(stream)
    man["stream_sha256"] = sha256_file(stream)
    man["kit_id"] = man["stream_sha256"][:16]
    psize = int(part_mib * MIB)
    n_parts = -(-man["stream_size"] // psize)
    with open(stream, "rb") as fs:
        for i in range(n_parts):
            name = f"p{i + 1:02d}"
            d = os.path.join(out, "parts", name)
            os.makedirs(d)
            path = os.path.join(d, f"kit.{name}")
            with open(path, "wb") as fp:
                fp.write(fs.read(psize))
            man["parts"].append({"name": name, "file": f"kit.{name}",
                                 "size": os.path.getsize(path), "sha256": sha256_file(path)})
    shutil.rmtree(tmp)
    text = json.dumps(man, indent=1)
    for p in [out] + [os.path.join(out, "parts", q["name"]) for q in man["parts"]]:
        with open(os.path.join(p, "manifest.json"), "w") as f:
            f.write(text)
    return man


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KitError(2, f"{path}: cannot read the kit manifest ({e})") from None


def _marker(dest: str) -> dict | None:
    p = os.path.join(dest, MARKER)
    return json.load(open(p)) if os.path.exists(p) else None


def _save_marker(dest: str, m: dict) -> None:
    with open(os.path.join(dest, MARKER + ".tmp"), "w") as f:
        json.dump(m, f)
    os.replace(os.path.join(dest, MARKER + ".tmp"), os.path.join(dest, MARKER))


def receive(src: str, dest: str) -> dict:
    """Move the part folder(s) found under ``src`` (``src/pNN/`` as carried) into ``dest``.

    p01 starts a new kit (``dest`` is cleared); any later part needs the marker of the same
    kit with every earlier part in ``dest``. Returns ``{"kit_id", "have", "missing"}``.

    Raises:
        KitError: code 3 (``/tmp`` lost or a part skipped: start over), 4 (a part's sha256
            differs from the manifest: resend it), 2 (no part carried, or a bad manifest).
    """
    found = sorted(d for d in (os.listdir(src) if os.path.isdir(src) else [])
                   if os.path.exists(os.path.join(src, d, "manifest.json")))
    if not found:
        raise KitError(2, f"{src}: no part folder (pNN/ with manifest.json) was carried")
    for name in found:
        man = _load(os.path.join(src, name, "manifest.json"))
        order = [p["name"] for p in man["parts"]]
        if name not in order:
            raise KitError(2, f"{src}/{name}: not a part of kit {man['kit_id']} ({order})")
        i = order.index(name)
        m = _marker(dest)
        part = man["parts"][i]
        dst = os.path.join(dest, part["file"])
        if m and m["kit_id"] == man["kit_id"] and name in m["have"] and os.path.exists(dst) \
                and os.path.getsize(dst) == part["size"]:
            continue  # a part folder left on the node by an earlier command: already here
        if i == 0:
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            shutil.copy(os.path.join(src, name, "manifest.json"), dest)
            m = {"kit_id": man["kit_id"], "have": []}
        elif m is None or m["kit_id"] != man["kit_id"]:
            raise KitError(KIT_LOST, f"{dest}/{MARKER}: "
                           + ("missing" if m is None else f"is of kit {m['kit_id']}")
                           + f" while {name} of kit {man['kit_id']} arrived: the node lost /tmp "
                           "between two commands (or started fresh). START OVER from p01.")
        else:
            gone = [q for q in order[:i] if q not in m["have"] or not os.path.exists(
                os.path.join(dest, f"kit.{q}"))]
            if gone:
                raise KitError(KIT_LOST, f"{dest}: parts {gone} missing before {name}: START "
                               "OVER from p01 (or send the missing parts in order).")
        shutil.copy(os.path.join(src, name, part["file"]), dst)
        got = sha256_file(dst)
        if got != part["sha256"]:
            os.remove(dst)
            raise KitError(BAD_SUM, f"{dst}: sha256 {got} != manifest {part['sha256']}: resend "
                           f"{name}")
        if name not in m["have"]:
            m["have"].append(name)
        _save_marker(dest, m)
    m = _marker(dest)
    man = _load(os.path.join(dest, "manifest.json"))
    missing = [p["name"] for p in man["parts"] if p["name"] not in m["have"]]
    return {"kit_id": man["kit_id"], "have": m["have"], "missing": missing}


def reassemble(dest: str, jobs: int | None = None) -> list[str]:
    """Check every part, join them, decompress the chunks in parallel and write the wheels into
    ``dest/wheels``; returns their paths.

    Raises:
        KitError: code 3 (a part missing), 4 (a sha256 mismatch; names the part, chunk or wheel).
    """
    man = _load(os.path.join(dest, "manifest.json"))
    m = _marker(dest)
    if m is None or m["kit_id"] != man["kit_id"]:
        raise KitError(KIT_LOST, f"{dest}/{MARKER}: missing or of another kit: START OVER")
    stream = os.path.join(dest, "stream")
    with open(stream, "wb") as fs:
        for p in man["parts"]:
            path = os.path.join(dest, p["file"])
            if p["name"] not in m["have"] or not os.path.exists(path):
                raise KitError(KIT_LOST, f"{path}: part {p['name']} missing: START OVER")
            with open(path, "rb") as f:
                shutil.copyfileobj(f, fs, 8 * MIB)
    got = sha256_file(stream)
    if got != man["stream_sha256"]:
        raise KitError(BAD_SUM, f"{stream}: sha256 {got} != manifest {man['stream_sha256']}")
    for p in man["parts"]:
        os.remove(os.path.join(dest, p["file"]))  # halve the disk footprint before decompressing
    raw = os.path.join(dest, "raw")
    with open(raw, "wb") as f:
        f.truncate(man["raw_size"])
    work = [(stream, c["offset"], c["size"], raw, c["raw_offset"], c["raw_size"],
             c["raw_sha256"]) for c in man["chunks"]]
    with ProcessPoolExecutor(min(jobs or os.cpu_count() or 1, max(1, len(work)))) as ex:
        errs = [e for _, e in ex.map(_decompress, work) if e]
    if errs:
        raise KitError(BAD_SUM, f"{stream}: " + "; ".join(errs))
    os.remove(stream)
    wdir = os.path.join(dest, "wheels")
    os.makedirs(wdir, exist_ok=True)
    out = []
    with open(raw, "rb") as fr:
        for w in man["wheels"]:
            path = os.path.join(wdir, w["name"])
            fr.seek(w["offset"])
            with open(path, "wb") as f:
                left = w["stored_size"]
                while left:
                    b = fr.read(min(8 * MIB, left))
                    f.write(b)
                    left -= len(b)
            got = sha256_file(path)
            if got != w["stored_sha256"]:
                raise KitError(BAD_SUM, f"{path}: sha256 {got} != manifest {w['stored_sha256']}")
            out.append(path)
    os.remove(raw)
    return out


def install(dest: str, target: str, python: str = sys.executable, jobs: int | None = None
            ) -> list[str]:
    """:func:`reassemble`, then ``pip install --no-index --no-deps --target target``; returns the
    wheel names installed.

    Raises:
        KitError: as :func:`reassemble`; code 5 when pip fails (its output is printed).
    """
    wheels = reassemble(dest, jobs)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", target, *wheels]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise KitError(PIP_FAILED, f"pip install --target {target} failed (exit "
                       f"{r.returncode}): {' '.join(cmd)}")
    shutil.rmtree(os.path.join(dest, "wheels"), ignore_errors=True)
    return [os.path.basename(w) for w in wheels]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu/kit.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="wheels -> kit folder with parts")
    p.add_argument("--out", required=True)
    p.add_argument("--part-mib", type=float, default=60)
    p.add_argument("--chunk-mib", type=int, default=32)
    p.add_argument("--preset", type=int, default=6)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("wheels", nargs="+")
    r = sub.add_parser("receive", help="take the carried part folder(s) into DEST")
    r.add_argument("--src", required=True)
    r.add_argument("--dest", required=True)
    i = sub.add_parser("install", help="check, reassemble and pip install --target")
    i.add_argument("--dest", required=True)
    i.add_argument("--target", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "pack":
            man = pack(a.wheels, a.out, a.part_mib, a.chunk_mib, a.preset, a.jobs)
            print(f"kit {man['kit_id']}: {len(man['wheels'])} wheels, "
                  f"{sum(w['size'] for w in man['wheels']) / MIB:.1f} MiB as wheels, "
                  f"{man['stream_size'] / MIB:.1f} MiB packed, {len(man['parts'])} parts "
                  f"({', '.join(p['name'] for p in man['parts'])}) in {a.out}/parts")
        elif a.cmd == "receive":
            s = receive(a.src, a.dest)
            print(f"kit {s['kit_id']}: have {','.join(s['have'])}; "
                  + (f"missing {','.join(s['missing'])}" if s["missing"] else "COMPLETE"))
        else:
            names = install(a.dest, a.target)
            print(f"installed {len(names)} wheels into {a.target}: {', '.join(names)}")
    except KitError as e:
        print(f"kit: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
