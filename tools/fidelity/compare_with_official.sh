#!/usr/bin/env bash
# Trains the same small SEDD model with the authors' trainer and with sedd-train on synthetic Markov
# data whose exact entropy is known, seed by seed, evaluates both EMA models with sedd-eval (K = 8,
# every validation window) and prints the paired comparison: every seed, ours - official with its
# 95% interval, and the runs that end 3% or more above their seed-mates.
#
#   SEDD_REF=DIR bash tools/fidelity/compare_with_official.sh [--steps N] [--seeds "21 22 ..."] \
#        [--out DIR] [--time-sampling iid|antithetic|stratified]
#
# SEDD_REF: an unpacked copy of the authors' code (louaaron/Score-Entropy-Discrete-Diffusion); their
# modules are used unchanged (sedd_ref_train.py drives them on our shards; tests/data/reference_shims.py
# stands in for their GPU-only imports). Needs the project's .venv (torch, h5py) and build/bin.
# Results: OUT/results.tsv (seed, official, ours, seconds official, seconds ours) and each run's
# loss curve (OUT/official<seed>.jsonl, OUT/ours<seed>/metrics.jsonl). Seeds already in
# results.tsv are skipped, so an interrupted comparison continues. --time-sampling sets ours only
# (the authors' trainer draws iid times).
set -u
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
steps=2000 seeds="21 22 23 24 25 26 27 28 29 30 31 32" out=$repo/runs/fidelity time_sampling=iid
while (($#)); do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --time-sampling) time_sampling=$2; shift 2 ;;
    *) echo "compare_with_official: unknown option '$1'" >&2; exit 2 ;;
  esac
done
: "${SEDD_REF:?set SEDD_REF to an unpacked copy of the authors' SEDD code}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SEDD_CORES=1
py=$repo/.venv/bin/python bin=$repo/build/bin D=$out/markov
mkdir -p "$out"
[[ -f $D/truth.json ]] || "$py" "$here/make_markov.py" "$D" --train-tokens 400000 --valid-tokens 40000 --alpha 0.08 >/dev/null
cat > "$out/tiny.ini" <<INI
[data]
train = $D/train-*.h5
valid = $D/valid-*.h5
seq_len = 64
[model]
hidden_size = 64
n_heads = 4
n_blocks = 2
cond_dim = 32
dropout = 0.0
scale_by_sigma = true
[diffusion]
graph = absorb
noise = loglinear
[train]
batch_size = 32
lr = 3e-3
warmup = 20
weight_decay = 0.0
grad_clip = 1.0
ema = 0.99
precision = fp32
log_every = 50
time_sampling = $time_sampling
INI
bound() {  # CHECKPOINT: nats/token of the EMA weights
  mpirun --oversubscribe --bind-to none -np 2 "$bin/sedd-eval" --checkpoint "$1" --data "$D/valid-*.h5" --mc-samples 8 \
    --device cpu --json "$out/eval.json" >/dev/null 2>&1 &&
    "$py" -c "import json;d=json.load(open('$out/eval.json'));d=d.get('datasets',[d])[0];print(f\"{d['nats_per_token']:.5f}\")"
}
echo "exact entropy: $("$py" -c "import json;print(round(json.load(open('$D/truth.json'))['nats_per_token'],4))") nats/token; $steps steps; ours: $time_sampling times"
for s in $seeds; do
  grep -q "^$s	" "$out/results.tsv" 2>/dev/null && continue
  t0=$SECONDS
  SEDD_REF=$SEDD_REF PYTHONPATH=$SEDD_REF "$py" "$here/sedd_ref_train.py" --train "$D/train-*.h5" --valid "$D/valid-*.h5" \
    --hidden 64 --heads 4 --blocks 2 --cond 32 --batch 32 --steps "$steps" --lr 3e-3 --warmup 20 --threads 1 --ema 0.99 \
    --seed "$s" --skip-valid 1 --log-every 50 --out "$out/official$s.jsonl" --save "$out/official$s.pth" >/dev/null 2>&1 ||
    { echo "seed $s: the authors' trainer failed"; exit 1; }
  "$py" "$repo/tools/sedd_convert.py" to-h5 "$out/official$s.pth" "$out/official$s.h5" --n-heads 4 --length 64 >/dev/null || exit 1
  t1=$SECONDS
  rm -rf "$out/ours$s"
  mpirun --oversubscribe --bind-to none -np 2 "$bin/sedd-train" --config "$out/tiny.ini" --run.dir "$out/ours$s" \
    --run.seed "$s" --train.steps "$steps" >/dev/null 2>&1 || { echo "seed $s: sedd-train failed"; exit 1; }
  t2=$SECONDS
  printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$(bound "$out/official$s.h5")" "$(bound "$out/ours$s")" $((t1 - t0)) $((t2 - t1)) \
    >> "$out/results.tsv"
  tail -n 1 "$out/results.tsv"
  rm -f "$out/official$s.pth"
done
"$py" "$here/paired_summary.py" "$out/results.tsv"
