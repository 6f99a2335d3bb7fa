#!/usr/bin/env bash
# The one command of every step of the GPU node sequence (benchmarks/gpu/README.md): run on the
# node from the repository root, with one part folder of the kit carried
# (benchmarks/gpu/kit/parts/pNN). It moves that part to /tmp/rectrain-kit (checking the marker
# of the earlier parts: exit 3 = the node lost /tmp, START OVER from p01); when the kit is then
# complete it checks every sha256, installs the wheels with pip --no-index --no-deps --target
# and runs the benchmark under a hard time limit, writing bench.json, bench.md and bench.log
# into $OUT. Env: BENCH_LIMIT (seconds, default 450), BENCH_ARGS (extra bench.py arguments),
# KIT_DEST (default /tmp/rectrain-kit), OUT (default /tmp/rectrain-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/rectrain-out}"
DEST="${KIT_DEST:-/tmp/rectrain-kit}"
PY="${PY:-python3}"
mkdir -p "$OUT"
start=$(date +%s)
if [ -d benchmarks/gpu/kit/parts ]; then
  "$PY" benchmarks/gpu/kit.py receive --src benchmarks/gpu/kit/parts --dest "$DEST" \
    | tee "$OUT/receive.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "node.sh: receive failed (exit $rc)"; exit "$rc"; }
  grep -q COMPLETE "$OUT/receive.txt" \
    || { echo "node.sh: part stored; send the next one NOW"; exit 0; }
fi
site="$DEST/site"
if [ ! -f "$site/.installed" ]; then
  "$PY" benchmarks/gpu/kit.py install --dest "$DEST" --target "$site" || exit $?
  touch "$site/.installed"
fi
echo "node.sh: kit ready in $(( $(date +%s) - start )) s"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
"$PY" -m rectrain.compat \
  || echo "node.sh: rectrain.compat found missing names (above); benchmarking anyway"
timeout -k 10 "${BENCH_LIMIT:-450}" "$PY" -m benchmarks.gpu.bench --out "$OUT" \
  --data /tmp/rectrain-bench-data ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
echo "node.sh: benchmark exit $rc; node time of this command $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/bench.log"
exit "$rc"
