import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded Ray for the whole session, started the way `rectrain` starts it locally,
    its processes seeing the S3 endpoint of tests/support/s3.py. Tests that need Ray ask for
    this fixture rather than letting the first ``init_ray`` start one (it would lack that
    endpoint, and its size would depend on which test came first)."""
    import ray

    from rectrain.launch.ray_launch import init_ray
    from tests.support import s3
    from tests.support.tiny import tiny_cfg

    with s3.for_ray_start():
        init_ray(tiny_cfg(str(tmp_path_factory.mktemp("ray"))))
    yield ray
    ray.shutdown()


# one two-node loopback Ray cluster per session, shared by test_submit.py and test_multinode.py
from tests.support.ray_cluster import cluster_prepared, ray_cluster  # noqa: E402,F401
