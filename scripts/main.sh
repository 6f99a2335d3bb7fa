#!/usr/bin/env bash
# The main job: set up .venv, then MovieLens-100K -> Ray Data prepare -> Ray Train + TorchRec DIN
# (2 workers) -> test metrics -> top-10 recommendations. Extra args go to `rectrain run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rectrain run --config jobs/movielens_din.yaml "$@"
