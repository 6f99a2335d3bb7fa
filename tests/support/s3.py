"""The S3 endpoint of the session's local Ray, for tests/test_s3_roundtrip.py.

Ray's processes (raylet, and the task / actor workers it starts) take their environment from
the driver when Ray starts, not when a test runs. ``ray_local`` (tests/conftest.py) therefore
starts Ray inside :func:`for_ray_start`: every Ray process of the session sees :data:`ENV`, an
S3 endpoint on a loopback port reserved at import and fake credentials. test_s3_roundtrip's
moto server listens on that port while its module runs, so its job runs on the shared Ray
instead of a CLI subprocess with a Ray of its own. The driver's environment holds ENV only
within that module (its ``s3_env`` fixture); nothing else of the suite talks to S3.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket


def _port() -> int:
    """A loopback port that is free now and that neither the kernel's ephemeral range (any
    outgoing connection may take one of those) nor Ray's worker ports (10002-19999) hand out
    later in the session."""
    lo = 20_000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            hi = int(f.read().split()[0])  # first ephemeral port
    except (OSError, ValueError, IndexError):
        hi = 32_768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(lo, max(hi, lo + 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {lo}-{hi}")


PORT = _port()
#: what Ray's processes and (inside test_s3_roundtrip) the driver see
ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}", "AWS_ACCESS_KEY_ID": "testing",
       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def environ(env: dict):
    """``os.environ`` with ``env`` set inside the block, as it was after it."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def for_ray_start():
    """Around ``ray.init`` of the session's local Ray: its processes inherit :data:`ENV`."""
    return environ(ENV)
