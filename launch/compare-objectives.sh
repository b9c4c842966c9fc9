#!/usr/bin/env bash
# Trains the tiny config once per objective on the demo corpus (same data, steps, optimizer and
# seed; each objective with its paper's defaults) and compares them on the validation split with sedd-compare: the likelihood bound of each
# diffusion objective next to the autoregressive model's exact likelihood.
#   bash launch/compare-objectives.sh [RANKS] [extra sedd-train options...]
#   SEDD_OBJECTIVES="ar dfm-mask" bash launch/compare-objectives.sh   # only these rows (ar scores the samples)
# Results: runs/objectives/<name>/ and runs/objectives/compare.json.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
ranks=${1:-2}
shift || true
out=runs/objectives
mkdir -p "$out"
[ -x build/bin/sedd-train ] || bash launch/setup.sh
[ -e datasets/demo/valid ] || bash datasets/make_demo.sh

# name | options that make the objective; each takes its paper's time conditioning, scale_by_sigma,
# time sampling and warmup start from the objective's defaults (docs/training.md, "Objectives")
recipes=(
  "sedd-absorb|"
  "sedd-uniform|--diffusion.graph uniform"
  "mdlm|--diffusion.objective mdlm"
  "d3pm-absorb|--diffusion.objective d3pm"
  "ar|--diffusion.objective ar"
  "dfm-mask|--diffusion.objective dfm"
  "dfm-uniform|--diffusion.objective dfm --diffusion.source uniform --diffusion.graph uniform"
)
wanted() { [ -z "${SEDD_OBJECTIVES:-}" ] || [[ " $SEDD_OBJECTIVES " == *" $1 "* ]]; }
checkpoints=()
for recipe in "${recipes[@]}"; do
  name=${recipe%%|*}
  wanted "$name" || continue
  read -r -a opts <<<"${recipe#*|}"
  checkpoints+=(--checkpoint "$out/$name")
  steps=$(sed -n 's/^steps *= *//p' configs/tiny.ini | head -1)
  if [ -d "$out/$name/checkpoints/step_$steps" ]; then  # finished earlier: compared again, not retrained
    echo "== $name: trained earlier ($out/$name)"
    continue
  fi
  echo "== $name: ${opts[*]:-(defaults)}"
  start=$(date +%s)
  bash launch/sedd-mpirun -np "$ranks" build/bin/sedd-train --config configs/tiny.ini --run.dir "$out/$name" \
    "${opts[@]}" "$@" | { grep 'valid' || true; } | tail -1
  echo "   trained in $(( $(date +%s) - start )) s"
done
echo "== comparison on the validation split"
bash launch/sedd-mpirun -np "$ranks" build/bin/sedd-compare "${checkpoints[@]}" --data 'demo-valid=datasets/demo/valid/*.h5' \
  --mc-samples 32 --json "$out/compare.json"
echo "== samples of each diffusion model (128 steps), scored by the autoregressive model"
for name in sedd-absorb sedd-uniform mdlm d3pm-absorb dfm-mask dfm-uniform; do
  wanted "$name" || continue
  bash launch/sedd-mpirun -np "$ranks" build/bin/sedd-sample --checkpoint "$out/$name" --num-samples 32 --steps 128 \
    --score-with "$out/ar" --stats "$out/$name/sample-stats.json" --out "$out/$name/samples.jsonl" 2>&1 |
    { grep -E 'generative perplexity|entropy' || true; } | sed "s/^/$name: /"
done
