#!/usr/bin/env bash
# The test suite: set up .venv with test tools, then pytest. Extra args go to pytest.
# Most of the suite's wall time is Ray start-up and Ray Train set-up (waiting, not computing),
# so two pytest-xdist workers, one test file each at a time, roughly halve it on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:warnings -p no:cacheprovider -n 2 --dist loadfile "$@"
