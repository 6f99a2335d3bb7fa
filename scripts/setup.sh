#!/usr/bin/env bash
# Create .venv in the repo and install rectrain with its pinned stack. Idempotent: a second run
# with unchanged pyproject.toml/setup.sh returns at once.
#   bash scripts/setup.sh          # runtime (CPU: fbgemm-gpu-cpu; GPU node: fbgemm-gpu, CUDA):
#                                  # what the main job (scripts/main.sh) needs
#   bash scripts/setup.sh --test   # + test tools (pytest, scikit-learn) and the optional extras
#                                  # the suite exercises: [text] (text_embedding features),
#                                  # [bench] (benchmark plots)
# torchrec's metadata pulls the multi-GB CUDA fbgemm-gpu, so torchrec is installed with --no-deps
# and its runtime needs are listed in pyproject.toml instead.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
if [ "${RECTRAIN_VARIANT:-}" = "gpu" ] || { [ -z "${RECTRAIN_VARIANT:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  extras="gpu"
fi
[ "${1:-}" = "--test" ] && extras="$extras,test,text,bench"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY="$c"; break; }; done
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "rectrain needs Python 3.11, found " + sys.version' 
[ -x .venv/bin/python ] || "$PY" -m venv .venv
hash="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
stamp=".venv/.rectrain-$hash-${extras//,/-}"
# done already (an install with the test tools also serves the runtime)
if [ -f "$stamp" ] || [ -f "$stamp-test-text-bench" ]; then exit 0; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -m pip install -q --no-deps torchrec==1.8.0
.venv/bin/python -c "import torch, torchrec, fbgemm_gpu, ray; print('rectrain env: torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
rm -f .venv/.rectrain-*
touch "$stamp"
