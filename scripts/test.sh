#!/usr/bin/env bash
# The test suite: set up .venv with test tools, then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:warnings -p no:cacheprovider "$@"
