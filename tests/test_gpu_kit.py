"""Dry run of the GPU node's offline wheel kit (benchmarks/gpu/kit.py): pack small local wheels
into several parts, carry them one by one into a fresh ``/tmp``-like folder, reassemble, check
every sha256 and install with ``pip install --no-index --no-deps --target``; the marker logic
that detects a node that lost ``/tmp`` between two commands. No network, no Ray, no torch."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from benchmarks.gpu import kit


def _wheel(d: str, name: str, payload: bytes) -> str:
    """A minimal valid pure-Python wheel ``name-1.0`` whose module holds ``payload``."""
    files = {f"{name}/__init__.py": f"DATA = {payload!r}\n".encode(),
             f"{name}-1.0.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    rec = []
    for p, b in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
        rec.append(f"{p},sha256={h},{len(b)}")
    rec.append(f"{name}-1.0.dist-info/RECORD,,")
    files[f"{name}-1.0.dist-info/RECORD"] = ("\n".join(rec) + "\n").encode()
    path = os.path.join(d, f"{name}-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, b in files.items():
            z.writestr(p, b)
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheels")
    rnd = os.urandom(300_000)  # incompressible: several parts of 0.1 MiB
    wheels = [_wheel(str(d), "kitdemo_a", rnd), _wheel(str(d), "kitdemo_b", b"x" * 50_000)]
    out = str(tmp_path_factory.mktemp("kit"))
    man = kit.pack(wheels, out, part_mib=0.1, chunk_mib=1, jobs=2)
    return wheels, out, man


def _carry(out: str, name: str, node: str) -> str:
    """What one remote command sees: the repository copy with only that part folder."""
    src = os.path.join(node, "repo_parts")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(os.path.join(out, "parts", name), os.path.join(src, name))
    return src


def test_pack_manifest(packed):
    wheels, out, man = packed
    assert len(man["parts"]) >= 3
    for p in man["parts"]:
        path = os.path.join(out, "parts", p["name"], p["file"])
        assert os.path.getsize(path) == p["size"] <= 0.1 * 2**20
        assert kit.sha256_file(path) == p["sha256"]
        with open(os.path.join(out, "parts", p["name"], "manifest.json")) as f:
            assert json.load(f) == man
    assert [w["name"] for w in man["wheels"]] == sorted(os.path.basename(w) for w in wheels)
    for w, src in zip(man["wheels"], sorted(wheels)):
        assert w["sha256"] == kit.sha256_file(src)
    assert sum(p["size"] for p in man["parts"]) == man["stream_size"]


def test_sequence_reassemble_install(packed, tmp_path):
    _, out, man = packed
    dest = str(tmp_path / "tmp" / "rectrain-kit")
    for i, p in enumerate(man["parts"]):
        s = kit.receive(_carry(out, p["name"], str(tmp_path)), dest)
        assert s["have"] == [q["name"] for q in man["parts"][:i + 1]]
        assert s["missing"] == [q["name"] for q in man["parts"][i + 1:]]
    target = str(tmp_path / "site")
    names = kit.install(dest, target, jobs=2)
    assert names == [w["name"] for w in man["wheels"]]
    r = subprocess.run([sys.executable, "-c", "import kitdemo_a, kitdemo_b; "
                        "print(len(kitdemo_a.DATA), len(kitdemo_b.DATA))"],
                       env={**os.environ, "PYTHONPATH": target}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["300000", "50000"]


def test_lost_tmp_and_corruption(packed, tmp_path):
    _, out, man = packed
    dest = str(tmp_path / "rectrain-kit")
    names = [p["name"] for p in man["parts"]]
    # a fresh node (no marker) that gets p02 first: start over
    with pytest.raises(kit.KitError) as e:
        kit.receive(_carry(out, names[1], str(tmp_path)), dest)
    assert e.value.code == kit.KIT_LOST and "START OVER" in str(e.value)
    # /tmp lost after p01 (marker gone): p02 is refused
    kit.receive(_carry(out, names[0], str(tmp_path)), dest)
    os.remove(os.path.join(dest, kit.MARKER))
    with pytest.raises(kit.KitError) as e:
        kit.receive(_carry(out, names[1], str(tmp_path)), dest)
    assert e.value.code == kit.KIT_LOST
    # a skipped part: p03 after p01
    kit.receive(_carry(out, names[0], str(tmp_path)), dest)
    with pytest.raises(kit.KitError) as e:
        kit.receive(_carry(out, names[2], str(tmp_path)), dest)
    assert e.value.code == kit.KIT_LOST and names[1] in str(e.value)
    # a part corrupted in transfer: refused with its name, not recorded
    src = _carry(out, names[1], str(tmp_path))
    with open(os.path.join(src, names[1], f"kit.{names[1]}"), "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(kit.KitError) as e:
        kit.receive(src, dest)
    assert e.value.code == kit.BAD_SUM and names[1] in str(e.value)
    assert kit.receive(_carry(out, names[0], str(tmp_path)), dest)["have"] == [names[0]]
    # install before the kit is complete: start over
    with pytest.raises(kit.KitError) as e:
        kit.reassemble(dest)
    assert e.value.code == kit.KIT_LOST


def test_cli_exit_codes(packed, tmp_path):
    _, out, man = packed
    dest = str(tmp_path / "k")
    p2 = _carry(out, man["parts"][1]["name"], str(tmp_path))
    assert kit.main(["receive", "--src", p2, "--dest", dest]) == kit.KIT_LOST
    p1 = _carry(out, man["parts"][0]["name"], str(tmp_path))
    assert kit.main(["receive", "--src", p1, "--dest", dest]) == 0
