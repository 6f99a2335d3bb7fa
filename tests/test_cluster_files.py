"""cluster/: the Ray cluster-launcher YAML, the KubeRay manifests and the image recipe agree with
the project (versions, image tags, resources, entry points, job files, CLI verbs)."""

import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from rectrain.cli import main
from rectrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()


def _pin(name: str) -> str:
    for dep in PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), []):
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([0-9.]+)", dep)
        if m:
            return m.group(2)
    m = re.search(rf"\b{re.escape(name)}==([0-9.]+)", SETUP)  # torchrec: installed --no-deps
    assert m, f"no pin for {name}"
    return m.group(1)


def _cli_verbs() -> set[str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["__no_such_verb__"])
    return set(re.findall(r"'([a-z-]+)'", err.getvalue().split("choose from", 1)[1]))


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cluster_specs() -> list[tuple[str, dict]]:
    rc, rj = _load("kuberay/raycluster.yaml"), _load("kuberay/rayjob.yaml")
    return [("raycluster.yaml", rc["spec"]), ("rayjob.yaml", rj["spec"]["rayClusterSpec"])]


def _image_ok(image: str, variant: str) -> bool:
    return re.fullmatch(rf"(.+/)?rectrain:{re.escape(VERSION)}-{variant}", image) is not None


def test_pins_the_image_recipe_installs():
    assert _pin("ray") == "2.60.0" and _pin("torch") == "2.13.0"
    assert _pin("torchrec") == "1.8.0" and _pin("fbgemm-gpu") == _pin("fbgemm-gpu-cpu") == "1.8.0"
    assert PROJECT["requires-python"] == ">=3.11,<3.12"
    df = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[0-9.]+-\S*-ubuntu22\.04$", df, re.M)
    assert "FROM ${CUDA_IMAGE}" in df
    assert "python3.11 python3.11-venv" in df and "PYTHON=python3.11 bash scripts/setup.sh" in df
    assert "ARG RECTRAIN_VARIANT=gpu" in df and "RECTRAIN_VARIANT=${RECTRAIN_VARIANT}" in df
    # the versions named in the recipe's header are the project's pins (no stale numbers)
    for name, ver in re.findall(r"(torchrec|torch|fbgemm-gpu|ray) ([0-9]+\.[0-9.]+[0-9])", df):
        assert ver == _pin(name), (name, ver)
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", df, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, missing in the repo"
    workdir = re.search(r"^WORKDIR (\S+)$", df, re.M).group(1)
    assert f"RECTRAIN_BASE_DIR={workdir}" in df and f"PATH={workdir}/.venv/bin:" in df
    # the image's build tags (in its comments) are the ones the cluster files use
    for tag in re.findall(r"-t (\S+)", df):
        assert _image_ok(tag, "gpu") or _image_ok(tag, "cpu"), tag


def test_kuberay_manifests_agree_with_the_project():
    df = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", df, re.M).group(1)
    rc, rj = _load("kuberay/raycluster.yaml"), _load("kuberay/rayjob.yaml")
    assert rc["apiVersion"] == rj["apiVersion"] == "ray.io/v1"
    assert (rc["kind"], rj["kind"]) == ("RayCluster", "RayJob")
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == _pin("ray"), name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        [hc] = _containers(head["template"])
        assert _image_ok(hc["image"], "cpu"), (name, hc["image"])
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            [wc] = _containers(group["template"])
            assert _image_ok(wc["image"], "gpu"), (name, wc["image"])
            gpus = wc["resources"]["limits"]["nvidia.com/gpu"]
            assert group["rayStartParams"]["num-gpus"] == gpus == \
                wc["resources"]["requests"]["nvidia.com/gpu"]
        for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            [c] = _containers(pod)
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
                "rectrain-ray-token"
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            # shared storage where the jobs' relative data/ and runs/ paths resolve
            assert {f"{workdir}/data", f"{workdir}/runs"} <= set(mounts)
            vols = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert vols[mounts[f"{workdir}/data"]["name"]]["persistentVolumeClaim"][
                "claimName"] == "rectrain-shared"


def test_rayjob_entrypoint_runs_a_real_verb_on_a_real_job_spec():
    rj = _load("kuberay/rayjob.yaml")
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "rectrain.cli"] and argv[3] in _cli_verbs()
    spec = argv[argv.index("--config") + 1]
    cfg = load_config(ROOT / spec)  # exists and validates
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] == workers["replicas"] == cfg.train.num_workers
    [sub] = _containers(rj["spec"]["submitterPodTemplate"])
    assert _image_ok(sub["image"], "cpu")


def test_aws_launcher_yaml():
    c = _load("aws.yaml")
    assert c["provider"]["type"] == "aws"
    assert _image_ok(c["docker"]["head_image"], "cpu")
    assert _image_ok(c["docker"]["worker_image"], "gpu")
    nodes = c["available_node_types"]
    assert c["head_node_type"] in nodes and nodes[c["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = nodes["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= c["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert "--gpus all" in c["docker"]["worker_run_options"]
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--head" in head_start
    df = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", df, re.M).group(1)
    mounts = [o.split(":")[1] for o in c["docker"]["run_options"] if o.startswith("-v ")]
    assert {f"{workdir}/data", f"{workdir}/runs"} <= set(mounts)


def test_commands_and_files_named_in_cluster_docs_exist():
    verbs = _cli_verbs()
    assert {"submit", "status", "logs", "stop", "run", "prepare", "train"} <= verbs
    texts = {p: p.read_text() for p in [*CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile",
                                        CLUSTER / "README.md"]}
    seen = 0
    for path, text in texts.items():
        # commands: `rectrain VERB` followed by a job spec, an option or a placeholder
        cmds = re.findall(r"\brectrain ([a-z-]+) (?=jobs/|--|[A-Z_]{3,})", text)
        cmds += re.findall(r"\brectrain submit \S+ .*?--verb ([a-z-]+)", text)
        for verb in cmds:
            assert verb in verbs, f"{path.name}: `rectrain {verb}` is not a CLI verb"
            seen += 1
        for job in re.findall(r"\bjobs/[A-Za-z0-9_.-]+\.yaml", text):
            assert (ROOT / job).is_file(), f"{path.name}: {job} does not exist"
        for f in re.findall(r"\bcluster/[A-Za-z0-9_./-]+\.(?:yaml|md)|cluster/Dockerfile", text):
            assert (ROOT / f).is_file(), f"{path.name}: {f} does not exist"
    assert seen >= 5
