#!/usr/bin/env bash
# The whole benchmark report in one command (ingest, train step, scaling, peers):
#   bash benchmarks/run_all.sh            # --size quick: the report (about 15 min on an idle 2-core box)
#   bash benchmarks/run_all.sh tiny       # seconds-to-minutes smoke run into benchmarks/results/tiny
#   bash benchmarks/run_all.sh full       # bigger workloads, more steps
# Sets up .venv first (scripts/setup.sh); the peers job creates benchmarks/.peer-venv once.
# Results: benchmarks/results/{REPORT.md,summary.json,<bench>.json,<bench>.md,<bench>*.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-quick}"
shift || true
out="benchmarks/results"
[ "$size" = "quick" ] || out="benchmarks/results/$size"
bash scripts/setup.sh
exec .venv/bin/python -m rectrain.cli bench all --size "$size" --out "$out" "$@"
