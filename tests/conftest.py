import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded Ray for the whole session, started the way `rectrain` starts it locally."""
    import ray

    from rectrain.launch.ray_launch import init_ray
    from tests.support.tiny import tiny_cfg

    init_ray(tiny_cfg(str(tmp_path_factory.mktemp("ray"))))
    yield ray
    ray.shutdown()


# one two-node loopback Ray cluster per session, shared by test_submit.py and test_multinode.py
from tests.support.ray_cluster import cluster_prepared, ray_cluster  # noqa: E402,F401
