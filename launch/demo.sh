#!/usr/bin/env bash
# The end-to-end demo on this machine: set up, build the demo corpus (Debian's fortunes), train
# the tiny config on 2 MPI ranks, sample text, evaluate the likelihood bound on two datasets, plot
# the loss.
# Everything lands in runs/demo/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
start=$(date +%s)
bash launch/setup.sh
bash datasets/make_demo.sh
run=runs/demo
rm -rf "$run"
mpi=(bash launch/sedd-mpirun -np 2)
echo; echo "== training (2 ranks, configs/tiny.ini) =="
"${mpi[@]}" build/bin/sedd-train --config configs/tiny.ini --run.dir "$run"
echo; echo "== sampling (analytic predictor, 128 steps, prefix 'The ') =="
"${mpi[@]}" build/bin/sedd-sample --checkpoint "$run" --num-samples 4 --steps 128 --prefix "The " \
  --out "$run/samples.jsonl"
python3 -c "
import json,sys
for l in open('$run/samples.jsonl'): print('  >', repr(json.loads(l)['text'])[:110])"
echo; echo "== likelihood bound on two datasets: the validation split and (seen) training text =="
"${mpi[@]}" build/bin/sedd-eval --checkpoint "$run" --data 'valid=datasets/demo/valid/*.h5' \
  --data 'train=datasets/demo/train/*.h5' --mc-samples 16 --max-sequences 256 --json "$run/eval.json"
.venv/bin/python tools/sedd_plot.py "$run" --out "$run/loss.png"
echo
echo "demo done in $(( $(date +%s) - start )) s: checkpoints, metrics.jsonl, samples.jsonl, eval.json and loss.png in $run/"
