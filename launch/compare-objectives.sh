#!/usr/bin/env bash
# Trains the tiny config once per objective on the demo corpus (same data, steps, optimizer and
# seed; each objective with its paper's defaults) and compares them on the validation split with sedd-compare: the likelihood bound of each
# diffusion objective next to the autoregressive model's exact likelihood.
#   bash launch/compare-objectives.sh [RANKS] [extra sedd-train options...]
#   SEDD_OBJECTIVES="ar dfm-mask" bash launch/compare-objectives.sh   # only these rows (ar scores the samples)
# The bd3 rows start from the mdlm row's final weights (train.init_from; block diffusion with one
# block is MDLM) and fine-tune for half the steps with their block size; they need the mdlm row.
# bd3-64 (one block of the whole window) is the control: the same start, steps and position 0.
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
  "bd3-64|--diffusion.objective bd3 --diffusion.block_size 64 --train.steps 600 --train.init_from MDLM"
  "bd3-16|--diffusion.objective bd3 --diffusion.block_size 16 --train.steps 600 --train.init_from MDLM"
  "bd3-4|--diffusion.objective bd3 --diffusion.block_size 4 --train.steps 600 --train.init_from MDLM"
)
base_steps=$(sed -n 's/^steps *= *//p' configs/tiny.ini | head -1)
mdlm_final="$out/mdlm/checkpoints/step_$base_steps/model.h5"
wanted() { [ -z "${SEDD_OBJECTIVES:-}" ] || [[ " $SEDD_OBJECTIVES " == *" $1 "* ]]; }
checkpoints=()
for recipe in "${recipes[@]}"; do
  name=${recipe%%|*}
  wanted "$name" || continue
  read -r -a opts <<<"${recipe#*|}"
  checkpoints+=(--checkpoint "$out/$name")
  steps=$base_steps
  for i in "${!opts[@]}"; do
    [ "${opts[$i]}" = --train.steps ] && steps=${opts[$((i + 1))]}
    if [ "${opts[$i]}" = MDLM ]; then
      [ -f "$mdlm_final" ] || { echo "$name starts from the mdlm row's weights: train it first ($mdlm_final)" >&2; exit 2; }
      opts[$i]=$mdlm_final
    fi
  done
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
for name in sedd-absorb sedd-uniform mdlm d3pm-absorb dfm-mask dfm-uniform bd3-64 bd3-16 bd3-4; do
  wanted "$name" || continue
  bash launch/sedd-mpirun -np "$ranks" build/bin/sedd-sample --checkpoint "$out/$name" --num-samples 32 --steps 128 \
    --score-with "$out/ar" --stats "$out/$name/sample-stats.json" --out "$out/$name/samples.jsonl" 2>&1 |
    { grep -E 'generative perplexity|entropy' || true; } | sed "s/^/$name: /"
done
echo "== block diffusion past the window: 320 tokens (the window is 64), first hitting, the clean blocks cached"
for name in bd3-16 bd3-4; do
  wanted "$name" || continue
  bash launch/sedd-mpirun -np "$ranks" build/bin/sedd-sample --checkpoint "$out/$name" --num-samples 4 --length 320 \
    --out "$out/$name/samples-320.jsonl" 2>&1 | { grep -E '^\[sample\] [^ ]+: ' || true; }
  head -c 400 "$out/$name/samples-320.jsonl" | sed "s/^/$name: /"; echo
done
