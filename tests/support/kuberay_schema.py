"""KubeRay's published CRD schemas (openAPIV3Schema of `ray.io/v1` RayCluster and RayJob) as a
JSON-Schema validator with Kubernetes' field semantics, for tests/test_cluster_files.py.

The data file tests/data/kuberay-v1.6.0-crd-schema.json is made from a KubeRay checkout with
    python -m tests.support.kuberay_schema KUBERAY_GIT_DIR v1.6.0 \
        tests/data/kuberay-v1.6.0-crd-schema.json
(ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml at that tag; descriptions
dropped and subtrees that repeat, such as the pod template, stored once under `$defs`).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "data" / "kuberay-v1.6.0-crd-schema.json"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
_MIN_SHARED = 2000  # bytes of JSON: smaller repeated subtrees stay inline


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _key(o) -> str:
    return json.dumps(o, sort_keys=True, separators=(",", ":"))


def _dedupe(doc: dict) -> dict:
    """Move every subtree of >= _MIN_SHARED bytes that occurs twice or more to `$defs`, largest
    first, replacing each occurrence with a `$ref` (JSON Schema 2020-12)."""
    defs: dict = {}
    while True:
        seen: dict[str, int] = {}

        def count(o):
            if isinstance(o, dict):
                if "$ref" not in o:
                    k = _key(o)
                    if len(k) >= _MIN_SHARED:
                        seen[k] = seen.get(k, 0) + 1
                for v in o.values():
                    count(v)
            elif isinstance(o, list):
                for v in o:
                    count(v)

        count(doc)
        count(defs)  # shared parts inside shared parts (a container inside the pod spec)
        shared = [k for k, n in seen.items() if n > 1]
        if not shared:
            return {"$defs": defs, **doc}
        big = max(shared, key=len)
        name = hashlib.sha1(big.encode()).hexdigest()[:12]
        defs[name] = json.loads(big)

        def swap(o):
            if isinstance(o, dict):
                if _key(o) == big:
                    return {"$ref": f"#/$defs/{name}"}
                return {k: swap(v) for k, v in o.items()}
            if isinstance(o, list):
                return [swap(v) for v in o]
            return o

        doc = swap(doc)
        defs = {k: swap(v) if k != name else v for k, v in defs.items()}


def extract(git_dir: str, ref: str) -> dict:
    """The `v1` openAPIV3Schema of each CRD in CRDS at `ref` of a KubeRay git repository."""
    commit = subprocess.check_output(
        ["git", "-C", git_dir, "rev-parse", f"{ref}^{{commit}}"], text=True).strip()
    kinds = {}
    for kind, name in CRDS.items():
        path = f"ray-operator/config/crd/bases/{name}"
        crd = yaml.safe_load(subprocess.check_output(
            ["git", "-C", git_dir, "show", f"{commit}:{path}"], text=True))
        assert crd["spec"]["names"]["kind"] == kind, path
        [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kinds[kind] = _strip(v1["schema"]["openAPIV3Schema"])
    body = _dedupe({"kinds": kinds})
    return {"source": {"repo": "github.com/ray-project/kuberay", "ref": ref, "commit": commit,
                       "paths": [f"ray-operator/config/crd/bases/{n}" for n in CRDS.values()],
                       "note": "v1 openAPIV3Schema; descriptions dropped; repeated subtrees "
                               "under $defs (tests/support/kuberay_schema.py)"},
            **body}


def _closed(o):
    """Kubernetes structural-schema semantics in JSON Schema: an object schema with
    `properties` admits no other field (the API server prunes unknown fields, `kubectl apply
    --validate=strict` rejects them) unless it says `x-kubernetes-preserve-unknown-fields`
    or has `additionalProperties`."""
    if isinstance(o, dict):
        o = {k: _closed(v) for k, v in o.items()}
        if ("properties" in o and "additionalProperties" not in o
                and not o.get("x-kubernetes-preserve-unknown-fields")):
            o["additionalProperties"] = False
        return o
    if isinstance(o, list):
        return [_closed(v) for v in o]
    return o


def load() -> dict:
    return json.loads(DATA.read_text())


def validator(kind: str):
    """A jsonschema Draft 2020-12 validator for one CRD kind (unknown fields are errors)."""
    import jsonschema

    doc = load()
    schema = _closed({"$defs": doc["$defs"], **doc["kinds"][kind]})
    return jsonschema.Draft202012Validator(schema)


if __name__ == "__main__":
    git_dir, ref, out = sys.argv[1:4]
    Path(out).write_text(json.dumps(extract(git_dir, ref), sort_keys=True, indent=None,
                                    separators=(",", ":")) + "\n")
