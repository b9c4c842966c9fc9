#!/usr/bin/env bash
# Builds the demo dataset from Debian's `fortunes` package (real English text, ~2 MB): every
# fortune is one document; 1 in 20 goes to the validation split. Byte tokenizer (vocab 257).
#   datasets/make_demo.sh [OUT_DIR]   (default: datasets/demo)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/datasets/demo}
bin=${SEDD_BUILD:-$repo/build}/bin
src=/usr/share/games/fortunes
[[ -d $src ]] || { echo "make_demo: $src not found; install Debian's fortunes package (launch/setup.sh does)" >&2; exit 1; }
if [[ -f $out/.complete ]]; then
  echo "[demo-data] $out already built"; exit 0
fi
rm -rf "$out"; mkdir -p "$out/raw"
python3 - "$src" "$out/raw" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
docs = []
for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if "." in name or os.path.islink(path) or not os.path.isfile(path):
        continue  # skip .dat indexes and .u8 links
    text = open(path, encoding="utf-8", errors="replace").read()
    docs += [d.strip("\n") for d in text.split("\n%\n") if d.strip()]
with open(os.path.join(out, "train.jsonl"), "w") as tr, open(os.path.join(out, "valid.jsonl"), "w") as va:
    for i, d in enumerate(docs):
        (va if i % 20 == 0 else tr).write(json.dumps({"text": d}) + "\n")
print(f"[demo-data] {len(docs)} fortunes from {src}")
PY
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --oversubscribe -np 2 "$bin/sedd-prepare" --input "$out/raw/train.jsonl" --jsonl-field text \
  --tokenizer byte --out "$out/train" --shard-tokens 500000
mpirun --oversubscribe -np 1 "$bin/sedd-prepare" --input "$out/raw/valid.jsonl" --jsonl-field text \
  --tokenizer byte --out "$out/valid" --shard-tokens 500000
touch "$out/.complete"
