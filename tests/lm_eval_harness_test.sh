#!/usr/bin/env bash
# tools/lm_eval_sedd.py end to end: local lm-eval-harness tasks (a multiple-choice task, a
# LAMBADA-style last-word task and a short generation task; YAML and JSON data written here, no
# network) run against a tiny autoregressive and a tiny SEDD checkpoint trained here; the
# harness's reported metrics must equal what sedd-score gives directly for the same requests.
# Exit 77 (skipped) only when lm_eval cannot be imported (launch/setup.sh installs it).
#   usage: lm_eval_harness_test.sh BIN_DIR SOURCE_DIR PYTHON
set -euo pipefail
bin=$1 src=$2 py=${3:-}
[[ -n $py && -x $py ]] || py=$src/.venv/bin/python
if ! why=$("$py" -c "import lm_eval" 2>&1); then
  echo "SKIPPED: lm_eval is not importable with $py (launch/setup.sh installs it): ${why##*$'\n'}"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SEDD_CORES=${SEDD_CORES:-1}
# Nothing may come from the network.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_HOME=$tmp/hf TOKENIZERS_PARALLELISM=false
mpirun=(mpirun --oversubscribe --bind-to none)

# A byte-level corpus and two tiny models trained on it for a few steps.
"$py" - "$tmp" <<'EOF'
import sys
words = "the quick brown fox jumps over the lazy dog".split()
with open(f"{sys.argv[1]}/corpus.txt", "w") as f:
    for i in range(300):
        f.write(" ".join(words) + "; ")
EOF
"${mpirun[@]}" -np 1 "$bin/sedd-prepare" --input "$tmp/corpus.txt" --format text --tokenizer byte --out "$tmp/data" \
  > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; exit 1; }
# (About 10 s on 2 cores: enough for both to complete the corpus's words, so the metrics are not 0.)
common=(--data.train "$tmp/data/*.h5" --run.device cpu --data.seq_len 32 --model.n_heads 2 --model.cond_dim 16
        --train.ema 0.95)
"${mpirun[@]}" -np 1 "$bin/sedd-train" "${common[@]}" --run.dir "$tmp/sedd" --model.hidden_size 64 --model.n_blocks 2 \
  --train.batch_size 16 --train.steps 800 --train.lr 3e-3 > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log"; exit 1; }
"${mpirun[@]}" -np 1 "$bin/sedd-train" "${common[@]}" --run.dir "$tmp/ar" --model.hidden_size 32 --model.n_blocks 1 \
  --train.batch_size 8 --train.steps 300 --train.lr 1e-2 --diffusion.objective ar --model.time_conditioning false \
  --model.scale_by_sigma false > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log"; exit 1; }

# The tasks: local JSON datasets and their YAML.
mkdir -p "$tmp/tasks"
"$py" - "$tmp" <<'EOF'
import json, sys
tmp = sys.argv[1]
mc = [("the quick brown fox jumps over the", ["lazy dog", "quick cat", "brown owl"], 0),
      ("the lazy", ["fox", "dog", "cat"], 1),
      ("fox jumps over", ["a hill", "the lazy dog", "the moon"], 1),
      ("dog; the quick", ["brown fox", "red hen", "grey wolf"], 0),
      ("jumps over the lazy", ["cow", "frog", "dog"], 2),
      ("the quick brown", ["bear", "fox", "duck"], 1)]
with open(f"{tmp}/mc.jsonl", "w") as f:
    for q, c, g in mc:
        f.write(json.dumps({"question": q, "choices": c, "gold": g}) + "\n")
texts = ["the quick brown fox jumps over the lazy dog", "dog; the quick brown fox", "the quick brown fox jumps",
         "over the lazy dog", "brown fox jumps over the lazy dog; the quick", "fox jumps over the lazy cat"]
with open(f"{tmp}/lastword.jsonl", "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
with open(f"{tmp}/gen.jsonl", "w") as f:
    for q, a in [("the quick brown", " fox"), ("jumps over the", " lazy")]:
        f.write(json.dumps({"question": q, "answer": a}) + "\n")
head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
with open(f"{tmp}/tasks/sedd_mc.yaml", "w") as f:
    f.write("task: sedd_mc\n" + head.format(f"{tmp}/mc.jsonl") +
            "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{gold}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
with open(f"{tmp}/tasks/sedd_lastword.yaml", "w") as f:
    f.write("task: sedd_lastword\n" + head.format(f"{tmp}/lastword.jsonl") +
            "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
            "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\ntarget_delimiter: \"\"\nmetric_list:\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
with open(f"{tmp}/tasks/sedd_gen.yaml", "w") as f:
    f.write("task: sedd_gen\n" + head.format(f"{tmp}/gen.jsonl") +
            "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "generation_kwargs:\n  until: [\";\", \"\\n\"]\n  max_gen_toks: 8\n"
            "metric_list:\n  - metric: exact_match\n")
EOF

status=0
for model in ar sedd; do
  echo "=== $model ==="
  # Two ranks for the harness's requests; the direct sedd-score run below uses one (the scores
  # depend on the requests' tokens and the seed only).
  if ! "$py" "$src/tools/lm_eval_sedd.py" --model sedd \
      --model_args "checkpoint=$tmp/$model,ranks=2,mc_samples=8,device=cpu,batch_size=4,steps=16,bin_dir=$bin" \
      --tasks sedd_mc,sedd_lastword,sedd_gen --include_path "$tmp/tasks" --output_path "$tmp/out_$model" \
      --log_samples > "$tmp/harness_$model.log" 2>&1; then
    cat "$tmp/harness_$model.log"
    echo "FAIL: the harness run failed for $model"
    exit 1
  fi
  grep -E '^\|' "$tmp/harness_$model.log" || true   # the harness's table
  "$py" - "$tmp" "$model" "$bin" <<'EOF' || status=1
import glob, json, math, os, subprocess, sys
tmp, model, bin_dir = sys.argv[1:4]
out = f"{tmp}/out_{model}"
results = json.load(open(sorted(glob.glob(f"{out}/**/results_*.json", recursive=True))[-1]))["results"]
def samples(task):
    f = sorted(glob.glob(f"{out}/**/samples_{task}_*.jsonl", recursive=True))[-1]
    return sorted((json.loads(l) for l in open(f)), key=lambda s: s["doc_id"])
mc, lw, gen = samples("sedd_mc"), samples("sedd_lastword"), samples("sedd_gen")
# The same (context, continuation) requests scored by sedd-score directly, one rank.
def args(s):
    a = s["arguments"]
    return [(v["arg_0"], v["arg_1"]) for v in a.values()] if isinstance(a, dict) else [tuple(x) for x in a]
requests = [r for s in mc + lw for r in args(s)]
with open(f"{tmp}/direct_{model}.jsonl", "w") as f:
    for i, (c, y) in enumerate(requests):
        f.write(json.dumps({"id": i, "context": c, "continuation": y}) + "\n")
subprocess.run(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "1", f"{bin_dir}/sedd-score",
                "--checkpoint", f"{tmp}/{model}", "--requests", f"{tmp}/direct_{model}.jsonl",
                "--out", f"{tmp}/scored_{model}.jsonl", "--mc-samples", "8", "--device", "cpu"], check=True,
               capture_output=True)
rows = [json.loads(l) for l in open(f"{tmp}/scored_{model}.jsonl")]
score = {r: (row["logprob"], row["is_greedy"]) for r, row in zip(requests, rows)}
fails = []
def check(cond, what):
    if not cond:
        fails.append(what)
# Multiple choice: the continuations are " " + choice; acc = the gold choice has the largest logprob.
correct = 0
for s in mc:
    reqs = args(s)
    check([y for _, y in reqs] == [" " + c for c in s["doc"]["choices"]], f"mc doc {s['doc_id']}: continuations {reqs}")
    lps = [score[r][0] for r in reqs]
    harness = [float(x[0]) for x in s["filtered_resps"]]
    check(all(abs(a - b) <= 1e-4 * max(1, abs(b)) for a, b in zip(harness, lps)),
          f"mc doc {s['doc_id']}: harness logprobs {harness} != sedd-score {lps}")
    correct += max(range(len(lps)), key=lambda i: lps[i]) == s["doc"]["gold"]
acc_mc = correct / len(mc)
check(abs(results["sedd_mc"]["acc,none"] - acc_mc) < 1e-12, f"mc acc {results['sedd_mc']['acc,none']} != {acc_mc}")
# Last word: acc = is_greedy, perplexity = exp(-mean logprob).
lps, greedy = [], []
for s in lw:
    (c, y), = args(s)
    check(y == " " + s["doc"]["text"].split(" ")[-1], f"last word doc {s['doc_id']}: continuation {y!r}")
    lps.append(score[(c, y)][0])
    greedy.append(bool(score[(c, y)][1]))
acc_lw, ppl_lw = sum(greedy) / len(lw), math.exp(-sum(lps) / len(lps))
check(abs(results["sedd_lastword"]["acc,none"] - acc_lw) < 1e-12,
      f"last-word acc {results['sedd_lastword']['acc,none']} != {acc_lw}")
check(abs(results["sedd_lastword"]["perplexity,none"] - ppl_lw) <= 1e-4 * ppl_lw,
      f"last-word perplexity {results['sedd_lastword']['perplexity,none']} != {ppl_lw}")
# Generation: the stop strings applied, at most max_gen_toks (8 bytes) generated.
for s in gen:
    text = s["filtered_resps"][0]
    text = text[0] if isinstance(text, list) else text
    check(";" not in text and "\n" not in text and len(text.encode()) <= 8, f"generation {text!r}")
print(f"{model}: harness mc acc {results['sedd_mc']['acc,none']:.4f} = sedd-score {acc_mc:.4f}; last word acc "
      f"{results['sedd_lastword']['acc,none']:.4f} = {acc_lw:.4f}, perplexity "
      f"{results['sedd_lastword']['perplexity,none']:.4f} = {ppl_lw:.4f}; generations "
      f"{[s['filtered_resps'][0] for s in gen]}")
for f in fails:
    print("FAIL:", f)
sys.exit(1 if fails else 0)
EOF
done
exit $status
