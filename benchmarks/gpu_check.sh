#!/usr/bin/env bash
# The train-step benchmark on a GPU node, prepared to finish within 10 minutes on one H200 with a
# fresh environment (the repo copy only):
#   RECTRAIN_VARIANT=gpu bash benchmarks/gpu_check.sh        # CUDA fbgemm-gpu, nccl, bf16 dense
#   bash benchmarks/gpu_check.sh --cpu                        # the CPU fallback (dry run)
#   RECTRAIN_PY=/work/main/.venv/bin/python bash benchmarks/gpu_check.sh --cpu   # no set-up
#   RECTRAIN_PY=python3 GPU_CHECK_PATHS=a,b bash benchmarks/gpu_check.sh   # a source checkout on a
#       node whose python3 already has the stack (no Ray: paths a,b). An air-gapped node with no
#       torchrec/fbgemm at all: benchmarks/gpu/README.md (offline wheel kit in parts).
# Runs (a) plain PyTorch, (b) TorchRec DMP (one process per GPU, nccl, CUDA TBE kernels with
# fused row-wise Adagrad) and (c) rectrain's Ray Train path on DIN (synthetic logs) and the
# Criteo-shaped DLRM workload, then prints the table. Results: benchmarks/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [ "${1:-}" = "--cpu" ] || ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  device=cpu
  echo "gpu_check: no GPU (or --cpu): running the CPU fallback with tiny sizes" >&2
fi
export RECTRAIN_VARIANT="${RECTRAIN_VARIANT:-$([ "$device" = cuda ] && echo gpu || echo cpu)}"
start=$(date +%s)
# RECTRAIN_PY=/path/to/python skips the set-up (an environment that already has rectrain's stack)
PY="${RECTRAIN_PY:-.venv/bin/python}"
[ -n "${RECTRAIN_PY:-}" ] || timeout 420 bash scripts/setup.sh
# run from this source checkout, installed or not
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ngpu=1
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ngpu=$(nvidia-smi -L | wc -l)
  size=quick
  extra=(--bf16)
else
  size=tiny
  extra=()
fi
out="benchmarks/results/gpu"
[ "$device" = cuda ] || out="benchmarks/results/gpu_cpu_fallback"
left=$(( 570 - ($(date +%s) - start) ))
[ "$left" -gt 60 ] || { echo "gpu_check: setup took too long, no time left" >&2; exit 1; }
timeout "$left" "$PY" -m rectrain.cli bench trainstep --size "$size" \
  --device "$device" --workers "$ngpu" --paths "${GPU_CHECK_PATHS:-a,b,c}" --out "$out" \
  "${extra[@]}"
cat "$out/trainstep.md"
echo "gpu_check: done in $(( $(date +%s) - start )) s"
