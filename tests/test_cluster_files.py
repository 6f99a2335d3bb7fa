"""cluster/: the Ray cluster-launcher YAML, the KubeRay manifests and the image recipe agree with
the project (versions, image tags, resources, entry points, job files, CLI verbs)."""

import contextlib
import os
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
        assert tag.startswith("$REGISTRY/"), tag  # pushed where the nodes pull from
    assert _dockerfile_env()["RAY_AUTH_MODE"] == "token"  # nodes and jobs run with token auth


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
            # token auth on every pod: the operator sets RAY_AUTH_MODE and RAY_AUTH_TOKEN from
            # this secret (test_kuberay_token_auth_goes_through_auth_options)
            assert spec["authOptions"] == {"mode": "token", "secretName": "rectrain-ray-token"}
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


# --- deployability (issue 12, kind 9): the files as KubeRay and Ray's cluster launcher read them

from tests.support import kuberay_schema  # noqa: E402

REGISTRY = "YOUR_REGISTRY"  # placeholder the user replaces (cluster/README.md)
KUBERAY_MIN = kuberay_schema.load()["source"]["ref"].lstrip("v")  # the schema the tests check
TOKEN_SECRET = "rectrain-ray-token"
# KubeRay versions that introduced what the manifests rely on (ray-project/kuberay sources):
KUBERAY_FEATURES = {
    # ray-operator/apis/ray/v1/rayjob_types.go: RayJobSpec.BackoffLimit first in v1.2.0 (#2192)
    "RayJob spec.backoffLimit": "1.2.0",
    # raycluster_types.go: AuthOptions.SecretName first in v1.6.0 (authOptions.mode in v1.5.1)
    "spec.authOptions.secretName": "1.6.0",
    # controllers/ray/common/pod.go initLivenessAndReadinessProbe: HTTP GET /api/healthz probes
    # (Ray >= 2.53) first in v1.6.0; before, `wget` exec probes, and the image has no wget
    "HTTP health probes": "1.6.0",
}


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text()))
            for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))]


def _pods(doc: dict) -> list[dict]:
    spec = doc["spec"]
    rc = spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    return pods + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def test_kuberay_manifests_validate_against_kuberay_crd_schema():
    """Every field of every manifest exists, with the right type and pattern, in the
    openAPIV3Schema of KubeRay's CRDs at the minimum version the manifests require."""
    src = kuberay_schema.load()["source"]
    assert src["repo"] == "github.com/ray-project/kuberay" and len(src["commit"]) == 40
    for name, doc in _manifests():
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
                  for e in kuberay_schema.validator(doc["kind"]).iter_errors(doc)]
        assert not errors, "\n".join(errors)


def test_kuberay_schema_check_rejects_unknown_and_mistyped_fields():
    [(_, doc)] = [m for m in _manifests() if m[1]["kind"] == "RayJob"]
    v = kuberay_schema.validator("RayJob")
    typo = yaml.safe_load(yaml.safe_dump(doc))
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e.message for e in v.iter_errors(typo))
    wrong = yaml.safe_load(yaml.safe_dump(doc))
    wrong["spec"]["backoffLimit"] = "none"
    assert any(list(e.absolute_path) == ["spec", "backoffLimit"] for e in v.iter_errors(wrong))


def test_kuberay_minimum_version_is_the_one_checked_and_covers_the_features_used():
    assert all(_ver(KUBERAY_MIN) >= _ver(v) for v in KUBERAY_FEATURES.values())
    for path in [*(CLUSTER / "kuberay").glob("*.yaml"), CLUSTER / "README.md",
                 ROOT / "docs" / "clusters.md"]:
        named = re.findall(r"KubeRay (?:>=|≥) ?v?([0-9.]*[0-9])", path.read_text())
        assert named and set(named) == {KUBERAY_MIN}, (path.name, named)


def test_kuberay_token_auth_goes_through_auth_options():
    """The operator sends a token to the dashboard (RayJob status, autoscaler) only with
    `spec.authOptions`; it then sets RAY_AUTH_MODE/RAY_AUTH_TOKEN (secret key `auth_token`) on
    the Ray containers, the autoscaler sidecar, the wait-gcs-ready init container and the RayJob
    submitter (KubeRay v1.6.0 common/pod.go SetContainerTokenAuthEnvVars, rayjob_controller.go
    configureSubmitterContainer). A RAY_AUTH_TOKEN set in a container would win over it."""
    for name, doc in _manifests():
        rc = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert rc.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, name
        assert rc["enableInTreeAutoscaling"] is True  # the sidecar gets the token from the operator
        for pod in _pods(doc):
            for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                env = {e["name"] for e in c.get("env", [])}
                assert not env & {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, (name, c["name"])
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {TOKEN_SECRET} --from-literal=auth_token=" in readme
    assert "{.data.auth_token}" in readme


def _images() -> list[tuple[str, str, str]]:
    out = []
    for name, doc in _manifests():
        for pod in _pods(doc):
            for c in pod["spec"]["containers"]:
                out.append((name, c["name"], c["image"]))
    aws = _load("aws.yaml")["docker"]
    out += [("aws.yaml", k, aws[k]) for k in ("head_image", "worker_image")]
    return out


def test_images_carry_a_registry_prefix_that_fails_loudly_when_left_unset():
    for name, where, image in _images():
        assert image.startswith(f"{REGISTRY}/"), (name, where, image)
        assert _image_ok(image, "cpu") or _image_ok(image, "gpu"), (name, where, image)
    # Docker reads a first component without '.' or ':' as a path component, which must be
    # lowercase (distribution/reference grammar): a pull of the unreplaced placeholder fails at
    # once with "invalid reference format" (Kubernetes: InvalidImageName)
    assert REGISTRY != REGISTRY.lower() and not set(".:") & set(REGISTRY)
    readme = (CLUSTER / "README.md").read_text()
    assert f"s#{REGISTRY}#$REGISTRY#g" in readme


def _dockerfile_env() -> dict[str, str]:
    df = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", df, re.M):
        env.update(dict(kv.split("=", 1) for kv in shlex.split(line)))
    return env


def _aws_prepared(monkeypatch) -> dict:
    """aws.yaml through Ray's own config preparation, with no AWS credentials and every boto3
    entry point made to fail (nothing here may reach AWS)."""
    import boto3
    from ray.autoscaler._private.util import prepare_config, validate_config

    for k in [k for k in __import__("os").environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")

    def no_aws(*a, **k):
        raise AssertionError("config preparation called AWS")

    for attr in ("client", "resource", "Session"):
        monkeypatch.setattr(boto3, attr, no_aws)
    prepared = prepare_config(_load("aws.yaml"))
    validate_config(prepared)  # ray/autoscaler/ray-schema.json + Ray's cross-field checks
    return prepared


def test_aws_yaml_passes_rays_schema_and_config_preparation(monkeypatch):
    c = _aws_prepared(monkeypatch)
    assert c["head_node_type"] == "head" and c["available_node_types"]["head"]["max_workers"] == 0
    # the autoscaler's AWS node provider on the head needs boto3: not Ray's default unpinned
    # `pip install boto3` at start (it upgrades botocore past aiobotocore's pin), but in the
    # head (cpu) image, matched to the installed botocore
    assert c["head_setup_commands"] == c["worker_setup_commands"] == []
    df = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r'"\$\{RECTRAIN_VARIANT\}" = cpu.*?pip install .*?boto3 \\\s+"botocore==\$\(',
                     df, re.S)


def test_aws_docker_mounts_give_the_container_the_auth_token(monkeypatch):
    """With Docker, Ray rsyncs each file mount to DOCKER_HOST_MOUNT/TARGET on the host and binds
    that into the container at TARGET ('~' = the image's HOME, /root without one); a `-v` in
    run_options binds a host path as it is. The container must see the token where Ray looks
    for it, and no bind may take a host path that nothing writes (Docker then makes an empty
    directory there)."""
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler.sdk import get_docker_host_mount_location

    c = _aws_prepared(monkeypatch)
    env = _dockerfile_env()
    df = (CLUSTER / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)$", df, re.M)[-1]
    home = env.get("HOME", "/root")  # what Ray's DockerCommandRunner.run_init reads
    run_home = env.get("HOME", f"/home/{user}")  # what the container's processes run with
    token_path = env.get("RAY_AUTH_TOKEN_PATH", f"{run_home}/.ray/auth_token")
    assert env["RAY_AUTH_MODE"] == "token"
    host_mnt = get_docker_host_mount_location(c["cluster_name"])
    written = {os.path.normpath(os.path.join(host_mnt, t.lstrip("/"))): src
               for t, src in c["file_mounts"].items()}
    made_dirs = [d for cmd in c["initialization_commands"]  # `mkdir -p DIR...` on the host
                 for dirs in re.findall(r"mkdir -p ((?:/\S+ ?)+)", cmd) for d in dirs.split()]
    d = c["docker"]
    for as_head in (True, False):
        opts = d["run_options"] + d.get("worker_run_options" if not as_head else
                                        "head_run_options", [])
        cmd = docker_start_cmds("ubuntu", d["head_image"], c["file_mounts"], d["container_name"],
                                opts, c["cluster_name"], home, "docker")
        binds = {}
        for src, dst in re.findall(r"-v (\S+?):(\S+?)(?::r[ow])?(?=\s)", cmd):
            assert dst not in binds, f"two binds on {dst}"
            binds[dst] = os.path.normpath(src)
        for dst, src in binds.items():
            assert src in written or any(src.startswith(m.rstrip("/") + "/") for m in made_dirs), \
                f"aws.yaml binds host {src} (nothing writes it) to {dst}"
        assert token_path in binds, f"nothing bound at {token_path}: {binds}"
        assert written.get(binds[token_path]) == "~/.ray/auth_token", binds[token_path]
    assert home == run_home, "ENV HOME in the image, or Ray puts '~/' file mounts under /root"
