#!/usr/bin/env bash
# datasets/zero-shot.sh end to end on small local copies of the papers' datasets in the layouts the
# hub and `datasets` use (hub Parquet, a save_to_disk Arrow folder, a `datasets` cache Arrow file,
# OpenAI's LAMBADA JSONL; WikiText-103 and PubMed absent): each prepared set holds, document for
# document, the `tokenizers` ids of the authors' detokenized text (the outputs stored in
# tests/data/detokenizer_reference.json by the authors' functions) plus end-of-text, empty rows
# included; suite.txt names every set with the paper's protocol; absent sets are reported as
# skipped; bad arguments exit 2.
#   usage: zero_shot_test.sh BIN_DIR SOURCE_DIR PYTHON
set -euo pipefail
bin=$1 src=$2 py=${3:-}
[[ -n $py && -x $py ]] || py=$src/.venv/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export SEDD_BIN=$bin SEDD_CORES=${SEDD_CORES:-1} TOKENIZERS_PARALLELISM=false
script=$src/datasets/zero-shot.sh
fail() { echo "FAIL: $*" >&2; exit 1; }

# The fixtures: rows taken from the detokenizer reference inputs; expect.json holds, per set, the
# ids of the authors' output for each row.
"$py" - "$tmp" "$src/tests/data/detokenizer_reference.json" <<'PY'
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
from tokenizers import ByteLevelBPETokenizer
tmp, ref_path = sys.argv[1], sys.argv[2]
ref = json.load(open(ref_path, encoding="utf-8"))
inputs, outputs = ref["inputs"], ref["outputs"]
S = os.path.join(tmp, "src")
def rows(lo, hi):
    return list(range(lo, hi))
sets = {  # name: (row indices, detokenizer or None)
    "wikitext2": (rows(0, 60), "wikitext"),
    "ptb": (rows(60, 110), "ptb"),
    "lm1b": (rows(110, 150), "lm1b"),
    "lambada": (rows(150, 180), "lambada"),
    "ag_news": (rows(180, 200), None),
    "scientific_papers_arxiv": (rows(200, 230), "scientific_papers"),
}
assert "" in [inputs[i] for i in sets["wikitext2"][0]], "the WikiText rows should hold an empty one"
texts = {n: [inputs[i] for i in idx] for n, (idx, d) in sets.items()}
want_text = {n: [outputs[d][i] if d else inputs[i] for i in idx] for n, (idx, d) in sets.items()}
def mk(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
# WikiText-2: the hub's Parquet, validation in two files (row groups of 7), test and train beside it.
w = texts["wikitext2"]
pq.write_table(pa.table({"text": w[:25]}), mk(f"{S}/wikitext/wikitext-2-raw-v1/validation-00000-of-00002.parquet"),
               row_group_size=7)
pq.write_table(pa.table({"text": w[25:]}), f"{S}/wikitext/wikitext-2-raw-v1/validation-00001-of-00002.parquet")
pq.write_table(pa.table({"text": ["not the split"]}), f"{S}/wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet")
pq.write_table(pa.table({"text": ["not the split"]}), f"{S}/wikitext/wikitext-2-raw-v1/train-00000-of-00001.parquet")
def arrow_stream(path, table):
    with pa.ipc.new_stream(mk(path), table.schema) as wr:
        for b in table.to_batches(max_chunksize=9):
            wr.write_batch(b)
# PTB: save_to_disk of a DatasetDict (Arrow streams in split folders), field "sentence".
arrow_stream(f"{S}/ptb_text_only/validation/data-00000-of-00001.arrow", pa.table({"sentence": texts["ptb"]}))
arrow_stream(f"{S}/ptb_text_only/test/data-00000-of-00001.arrow", pa.table({"sentence": ["not the split"]}))
open(f"{S}/ptb_text_only/dataset_dict.json", "w").write('{"splits": ["validation", "test"]}')
# LM1B: the `datasets` cache (NAME-SPLIT.arrow), large_string.
arrow_stream(f"{S}/lm1b/plain_text/1.0.0/abc123/lm1b-test.arrow",
             pa.table({"text": pa.array(texts["lm1b"], pa.large_string())}))
arrow_stream(f"{S}/lm1b/plain_text/1.0.0/abc123/lm1b-train.arrow", pa.table({"text": ["not the split"]}))
# LAMBADA: OpenAI's JSONL.
with open(mk(f"{S}/lambada/lambada_test.jsonl"), "w", encoding="utf-8") as f:
    for t in texts["lambada"]:
        f.write(json.dumps({"text": t}) + "\n")
# AG News: hub Parquet under data/, with its label column.
pq.write_table(pa.table({"text": texts["ag_news"], "label": list(range(20))}),
               mk(f"{S}/ag_news/data/test-00000-of-00001.parquet"))
pq.write_table(pa.table({"text": ["not the split"], "label": [0]}), f"{S}/ag_news/data/train-00000-of-00001.parquet")
# arXiv: Parquet per split folder, field "article" beside abstract and section_names.
a = texts["scientific_papers_arxiv"]
pq.write_table(pa.table({"article": a, "abstract": ["x"] * len(a), "section_names": ["y"] * len(a)}),
               mk(f"{S}/scientific_papers/arxiv/validation/0000.parquet"))
t = ByteLevelBPETokenizer()
t.train_from_iterator(sum(want_text.values(), []) * 2, vocab_size=600, min_frequency=2,
                      special_tokens=["<|endoftext|>"])
t.save(os.path.join(tmp, "tokenizer.json"))
eot = t.token_to_id("<|endoftext|>")
expect = {n: sum([t.encode(s).ids + [eot] for s in docs], []) for n, docs in want_text.items()}
json.dump(expect, open(os.path.join(tmp, "expect.json"), "w"))
PY

# The MDLM protocol (default): every present set prepared, the two absent ones skipped.
bash "$script" "$tmp/src" "$tmp/out" --tokenizer "$tmp/tokenizer.json" --length 64 > "$tmp/log" 2>&1 ||
  { cat "$tmp/log"; fail "zero-shot.sh failed"; }
cat "$tmp/log"
for n in wikitext103 scientific_papers_pubmed; do
  grep -q "^\[zero-shot\] $n: skipped, not in $tmp/src" "$tmp/log" || fail "no skip line for $n"
done
grep -q "^\[zero-shot\] 6 dataset(s); suite: $tmp/out/suite.txt" "$tmp/log" || fail "no summary line"
"$py" - "$tmp" <<'PY' || fail "shards differ from the detokenized, tokenized fixture text"
import glob, json, sys
import h5py
tmp = sys.argv[1]
expect = json.load(open(f"{tmp}/expect.json"))
bad = 0
for name, ids in expect.items():
    got = []
    for f in sorted(glob.glob(f"{tmp}/out/{name}/shard-*.h5")):
        with h5py.File(f, "r") as h:
            got += [int(x) for x in h["tokens"][:]]
    if got != ids:
        bad += 1
        k = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
        print(f"{name}: {len(got)} tokens, expected {len(ids)}; first difference at {k}")
    else:
        print(f"{name}: {len(got)} tokens as expected")
sys.exit(1 if bad else 0)
PY
want_suite=$(for n in wikitext2 ptb lm1b lambada ag_news scientific_papers_arxiv; do
  echo "$n $tmp/out/$n/shard-*.h5 mdlm-wrap"; done)
got_suite=$(grep -v '^#' "$tmp/out/suite.txt")
[[ $got_suite == "$want_suite" ]] || fail "suite.txt:"$'\n'"$got_suite"$'\n'"expected:"$'\n'"$want_suite"
grep -q '^# .*model length 64' "$tmp/out/suite.txt" || fail "suite.txt does not state the length"

# The SEDD protocol, one set.
bash "$script" "$tmp/src" "$tmp/out-sedd" --tokenizer "$tmp/tokenizer.json" --paper sedd --only ptb > "$tmp/log" 2>&1 ||
  { cat "$tmp/log"; fail "zero-shot.sh --paper sedd failed"; }
[[ $(grep -v '^#' "$tmp/out-sedd/suite.txt") == "ptb $tmp/out-sedd/ptb/shard-*.h5 sedd" ]] ||
  fail "suite.txt of --paper sedd: $(cat "$tmp/out-sedd/suite.txt")"
grep -q "warning: .* tokens, fewer than one window of --length 1024" "$tmp/log" || fail "no short-set warning"

# Failures: exit 2 with one clear line, nothing written.
expect_exit2() {
  local want=$1; shift
  local rc=0
  bash "$script" "$@" > "$tmp/log" 2>&1 || rc=$?
  ((rc == 2)) || { cat "$tmp/log"; fail "exit $rc, expected 2, for: $*"; }
  grep -qF -- "$want" "$tmp/log" || { cat "$tmp/log"; fail "no '$want' for: $*"; }
}
expect_exit2 "--tokenizer byte: not a tokenizer.json file" "$tmp/src" "$tmp/bad" --tokenizer byte
expect_exit2 "--paper gpt2: expected mdlm or sedd" "$tmp/src" "$tmp/bad" --tokenizer "$tmp/tokenizer.json" --paper gpt2
expect_exit2 "SRC $tmp/nowhere: no such folder" "$tmp/nowhere" "$tmp/bad" --tokenizer "$tmp/tokenizer.json"
expect_exit2 "unknown dataset 'wiki'" "$tmp/src" "$tmp/bad" --tokenizer "$tmp/tokenizer.json" --only wiki
expect_exit2 "give SRC and OUT" "$tmp/src" --tokenizer "$tmp/tokenizer.json"
mkdir -p "$tmp/empty"
expect_exit2 "holds none of the datasets" "$tmp/empty" "$tmp/bad" --tokenizer "$tmp/tokenizer.json"
[[ ! -e $tmp/bad ]] || fail "a failed run left $tmp/bad"
# A second run into the same folder is refused by sedd-prepare (shards already there), naming them.
rc=0
bash "$script" "$tmp/src" "$tmp/out" --tokenizer "$tmp/tokenizer.json" --only ag_news > "$tmp/log" 2>&1 || rc=$?
((rc == 2)) && grep -q "sedd-prepare failed for ag_news" "$tmp/log" || { cat "$tmp/log"; fail "rerun not refused (exit $rc)"; }
echo "zero_shot_datasets: ok"
