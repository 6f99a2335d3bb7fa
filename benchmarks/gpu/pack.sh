#!/usr/bin/env bash
# Build the offline wheel kit for the air-gapped GPU node (run where PyPI is reachable):
#   bash benchmarks/gpu/pack.sh            # -> benchmarks/gpu/kit/ (git-ignored): wheels/, parts/pNN/, manifest.json
# The node has Python 3.12 and torch 2.11.0+cu130 but no torchrec, fbgemm-gpu, tensordict or
# pydantic: this downloads their cp312 manylinux x86_64 wheels (no dependencies resolved: each
# one is named here, pinned), then `kit.py pack` rewrites them stored, compresses them (LZMA, in
# 32 MiB chunks) and cuts them into parts of at most PART_MIB (default 60) MiB, each in its own
# folder with the manifest (sha256 of every part, chunk and wheel). Ray is not in the kit (see
# benchmarks/gpu/README.md). Needs ~3.5 GB of free disk while packing; ~5 min on 2 cores.
# Env: PY (a Python >= 3.10 with pip; default python3), PART_MIB, KIT (output folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-python3}"
KIT="${KIT:-benchmarks/gpu/kit}"
PART_MIB="${PART_MIB:-60}"
# The CUDA fbgemm-gpu that matches torch 2.11 (its wheel links libcudart.so.13 like torch
# 2.11.0+cu130), the torchrec of that release, and what they and rectrain's config import that
# the node lacks. torchrec's own requirements iopath (torchrec.datasets only) and
# torchmetrics==1.0.3 (torchrec.metrics only; the node has 1.9) are not imported by rectrain.
WHEELS=(
  fbgemm-gpu==1.6.0
  torchrec==1.6.1
  tensordict==0.15.3 pyvers==0.2.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
)
mkdir -p "$KIT/wheels"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$KIT/wheels" "${WHEELS[@]}"
# keep exactly the wheels named above (an earlier run's other versions would stop the install)
keep=()
for w in "${WHEELS[@]}"; do
  n="${w%%==*}"; v="${w##*==}"
  f=$(ls "$KIT/wheels"/$(echo "$n" | tr - _)-"$v"-*.whl 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "pack.sh: no wheel for $w in $KIT/wheels" >&2; exit 1; }
  keep+=("$f")
done
"$PY" benchmarks/gpu/kit.py pack --out "$KIT/packed" --part-mib "$PART_MIB" "${keep[@]}"
rm -rf "$KIT/parts" && mv "$KIT/packed/parts" "$KIT/parts"
mv "$KIT/packed/manifest.json" "$KIT/manifest.json" && rm -rf "$KIT/packed"
ls -l "$KIT"/parts/*/kit.p* | awk '{print $5, $9}'
