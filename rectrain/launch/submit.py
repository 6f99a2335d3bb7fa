"""Ray Jobs submission: ``rectrain submit|status|logs|stop`` over ``ray.job_submission``.

A submitted job runs ``python -m rectrain.cli VERB --config SPEC [ARGS...]`` on the cluster's head
node, in a copy of the local working directory (``runtime_env.working_dir``; ``.venv``, ``runs``,
``data``, ``.git`` and caches left out). The entrypoint is built as an argument list and every
piece is ``shlex.quote``-d, so neither a job path nor a field can inject shell commands; verbs
and environment-variable names are checked against a strict pattern before anything is sent.

Upstream APIs: ``ray.job_submission.JobSubmissionClient`` (Ray Jobs REST API on the dashboard
port, 8265 by default) and Ray's token authentication (Ray >= 2.52: ``Authorization: Bearer``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from rectrain.config import ConfigError, read_yaml_mapping
from rectrain.launch import worker_setup

#: verbs whose job spec is a rectrain :class:`~rectrain.config.JobConfig` (validated before
#: submission); other verbs (e.g. ``bench``) get ``--config SPEC`` unvalidated
CONFIG_VERBS = ("prepare", "train", "run", "recommend")
#: verbs that talk to a job server, never submitted as a job themselves
CLIENT_VERBS = ("submit", "status", "logs", "stop")
#: working-dir paths never uploaded (gitignore syntax, relative to the working dir)
EXCLUDES = ["/.venv/", "/runs/", "/data/", "/.git", "/.cache/", "__pycache__/", "*.pyc",
            ".pytest_cache/", "*.egg-info/", "/build/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_VERB = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class SubmitError(ConfigError):
    """A submission request is invalid (unknown verb, missing spec, bad env var, no address)."""


def job_server_address(address: Optional[str]) -> str:
    """The Ray Jobs API address: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else
    ``$RAY_ADDRESS`` (as Ray's own ``ray job`` CLI reads them).

    Raises:
        SubmitError: none of them is set.
    """
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SubmitError("no job server address: pass --address http://HEAD:8265 or set "
                          "RAY_ADDRESS / RAY_API_SERVER_ADDRESS")
    return addr


def auth_token() -> Optional[str]:
    """Ray's token for token-authenticated clusters (``ray start`` enables token auth when a
    token exists): ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``; ``None`` when there is none."""
    tok = os.environ.get("RAY_AUTH_TOKEN")
    if tok:
        return tok.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.path.isfile(path):
        return Path(path).read_text().strip() or None
    return None


def client(address: Optional[str]):
    """A ``JobSubmissionClient`` for the job server, sending the auth token when one exists.

    The header is passed explicitly: Ray adds it by itself only when ``RAY_AUTH_MODE=token`` was
    set before ``ray`` was first imported, which a CLI cannot guarantee.
    """
    from ray.job_submission import JobSubmissionClient

    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    return JobSubmissionClient(job_server_address(address), headers=headers)


def _rel_or_abs(path: Path, working_dir: Path) -> str:
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        # outside the uploaded tree: the cluster must see the same absolute path
        return str(path.resolve())


def build_entrypoint(verb: str, spec: str, working_dir: str, args: Iterable[str] = (),
                     known_verbs: Iterable[str] = (), python: str = "python") -> str:
    """The shell command Ray Jobs runs: ``python -m rectrain.cli VERB --config SPEC ARGS...``.

    ``recommend`` of a spec without a ``recommend:`` section gets ``--checkpoint RUN_DIR``
    instead (``run_dir`` as written in the spec, so a relative one resolves in the job's working
    directory); with one, ``--config SPEC`` runs that section on the cluster. A spec inside ``working_dir`` is
    passed relative to it (it travels with the upload); one outside it is passed by absolute
    path, which must then exist on the head node. Every piece is ``shlex.quote``-d.

    Raises:
        SubmitError: unknown or malformed verb, missing spec, a spec that is not a YAML mapping
            or (for prepare/train/run/recommend) not a valid job config.
    """
    known = [v for v in known_verbs if v not in CLIENT_VERBS]
    if not _VERB.match(verb or "") or (known and verb not in known):
        raise SubmitError(f"--verb {verb!r}: not a rectrain verb; known: {', '.join(known)}")
    p = Path(spec)
    if not p.is_file():
        raise SubmitError(f"{spec}: job spec not found")
    raw = read_yaml_mapping(p, SubmitError)
    if verb in CONFIG_VERBS:
        from rectrain.config import config_from_dict, job_dict
        raw = job_dict(p)  # with its extends: chain
        config_from_dict(raw, source=spec)  # a bad spec fails here, not minutes later
    wd = Path(working_dir)
    pieces = [python, "-m", "rectrain.cli", verb]
    if verb == "recommend" and not raw.get("recommend"):  # no recommend: section: brute force
        pieces += ["--checkpoint", str(raw["run_dir"])]
    else:
        pieces += ["--config", _rel_or_abs(p, wd)]
    pieces += [str(a) for a in args]
    return shlex.join(pieces)


def project_requirements(variant: str = "gpu", root: Optional[str] = None) -> list[str]:
    """Pinned pip requirements from ``pyproject.toml``: core dependencies, the extras named in
    ``variant`` (comma-separated: ``cpu`` fbgemm-gpu-cpu or ``gpu`` fbgemm-gpu, plus e.g.
    ``text`` for text_embedding features) and ``torchrec==1.8.0`` (what ``scripts/setup.sh``
    installs).

    Raises:
        SubmitError: an extra that pyproject.toml does not define.
    """
    import tomllib

    root_dir = Path(root) if root else Path(__file__).resolve().parents[2]
    proj = tomllib.loads((root_dir / "pyproject.toml").read_text())["project"]
    extra = proj.get("optional-dependencies", {})
    reqs = list(proj["dependencies"])
    for name in variant.split(","):
        if name not in extra:
            raise SubmitError(f"--pip {name!r}: pyproject.toml has no such extra; "
                              f"known: {', '.join(sorted(extra))}")
        reqs += extra[name]
    setup = (root_dir / "scripts" / "setup.sh").read_text()
    m = re.search(r"torchrec==[0-9][0-9.]*", setup)
    return reqs + ([m.group(0)] if m else [])


def build_runtime_env(working_dir: str, env: Iterable[str] = (), pip: Optional[str] = None
                      ) -> dict:
    """``runtime_env`` for the job: the working dir minus :data:`EXCLUDES`, ``env_vars`` from
    ``KEY=VALUE`` strings, and (with ``pip`` = ``cpu``/``gpu``) the project's pinned pip
    requirements; without ``pip`` the nodes must already have rectrain's stack (the image in
    ``cluster/Dockerfile``). Every worker runs :func:`rectrain.launch.worker_setup.preload`
    (``worker_process_setup_hook``) at start.

    Raises:
        SubmitError: a missing working dir or a malformed ``KEY=VALUE``.
    """
    wd = Path(working_dir)
    if not (wd / "rectrain" / "cli.py").is_file():
        raise SubmitError(f"--working-dir {working_dir}: not a rectrain checkout "
                          f"(no rectrain/cli.py)")
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env_vars[key] = value
    rt: dict = {"working_dir": str(wd.resolve()), "excludes": list(EXCLUDES),
                "env_vars": env_vars, "worker_process_setup_hook": worker_setup.HOOK}
    if pip:
        rt["pip"] = {"packages": project_requirements(pip, str(wd)), "pip_check": False}
    return rt


def submit(spec: str, verb: str = "run", address: Optional[str] = None,
           working_dir: Optional[str] = None, args: Iterable[str] = (), env: Iterable[str] = (),
           pip: Optional[str] = None, submission_id: Optional[str] = None,
           known_verbs: Iterable[str] = ()) -> str:
    """Submit ``rectrain VERB`` on ``spec`` to the Ray job server; returns the job id.

    Raises:
        SubmitError: see :func:`build_entrypoint` and :func:`build_runtime_env`.
    """
    wd = working_dir or os.getcwd()
    entrypoint = build_entrypoint(verb, spec, wd, args, known_verbs)
    runtime_env = build_runtime_env(wd, env, pip)
    if submission_id is not None and not _SUBMISSION_ID.match(submission_id):
        raise SubmitError(f"--submission-id {submission_id!r}: use letters, digits, _.:-")
    c = client(address)
    return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                        submission_id=submission_id,
                        metadata={"rectrain_verb": verb, "rectrain_spec": os.path.basename(spec)})


def wait(job_id: str, address: Optional[str] = None, timeout_s: float = 3600.0,
         poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status.

    Raises:
        TimeoutError: still running after ``timeout_s`` seconds.
    """
    c = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow_logs(job_id: str, address: Optional[str] = None, out=None) -> str:
    """Stream the job's logs until it ends (``JobSubmissionClient.tail_job_logs``); returns
    the final status."""
    import asyncio

    c = client(address)
    out = out or sys.stdout  # looked up now: the caller may have redirected it

    async def _tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return wait(job_id, address, timeout_s=60.0)


def main(args) -> int:
    """Dispatch ``rectrain submit|status|logs|stop`` (argparse namespace from ``rectrain.cli``);
    returns the process exit code (0; 1 when a waited/followed job did not succeed)."""
    if args.verb == "submit":
        extra = shlex.split(args.args) if args.args else []
        job_id = submit(args.spec, verb=args.job_verb, address=args.address,
                        working_dir=args.working_dir, args=extra, env=args.env or (),
                        pip=args.pip, submission_id=args.submission_id,
                        known_verbs=args.known_verbs)
        print(job_id, flush=True)
        if args.follow:
            status = follow_logs(job_id, args.address)
            print(f"[rectrain] job {job_id}: {status}", file=sys.stderr, flush=True)
            return 0 if status == "SUCCEEDED" else 1
        return 0
    c = client(args.address)
    if args.verb == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}"
              + (f" ({info.message})" if info.message else ""), flush=True)
        return 0
    if args.verb == "logs":
        if args.follow:
            status = follow_logs(args.job_id, args.address)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(c.get_job_logs(args.job_id))
        sys.stdout.flush()
        return 0
    if args.verb == "stop":
        stopped = c.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}", flush=True)
        return 0
    raise SubmitError(f"unknown verb {args.verb!r}")
