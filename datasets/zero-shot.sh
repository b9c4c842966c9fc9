#!/usr/bin/env bash
# Prepares the zero-shot evaluation sets of the SEDD and MDLM papers from local copies of the
# Hugging Face datasets, as each paper's code prepares them (split, text field, detokenizer, empty
# rows kept as one end-of-text token), and writes OUT/suite.txt for `sedd-eval --suite`.
#
#   datasets/zero-shot.sh SRC OUT --tokenizer PATH/tokenizer.json [--paper mdlm|sedd] [--length L]
#                         [--only NAME[,NAME...]] [--np N] [--overwrite]
#
# SRC/<folder> per dataset (the first folder that exists; a dataset without one is skipped):
#   wikitext2                 wikitext/wikitext-2-raw-v1 | wikitext-2-raw-v1 | wikitext2      field text
#   wikitext103               wikitext/wikitext-103-raw-v1 | wikitext-103-raw-v1 | wikitext103 field text
#   ptb                       ptb_text_only | ptb                                             field sentence
#   lm1b                      lm1b                                                            field text
#   lambada                   lambada_openai | lambada (also lambada_test.jsonl, OpenAI's)     field text
#   ag_news                   ag_news                                                         field text
#   scientific_papers_arxiv   scientific_papers/arxiv | scientific_papers_arxiv | arxiv      field article
#   scientific_papers_pubmed  scientific_papers/pubmed | scientific_papers_pubmed | pubmed   field article
# Inside it, the split's files, in name order, as the hub or `datasets` store them:
#   SPLIT-*.parquet, SPLIT.parquet, */SPLIT-*.parquet, SPLIT/*.parquet, */SPLIT/*.parquet (hub),
#   SPLIT/data-*.arrow (save_to_disk of a DatasetDict; data-*.arrow directly for lambada, a Dataset),
#   *-SPLIT.arrow, *-SPLIT-NNNNN-of-NNNNN.arrow (the `datasets` cache), SPLIT*.jsonl, *_SPLIT.jsonl.
#   Parquet is taken before Arrow before JSONL when a folder holds several copies.
# Splits (both papers' code: MDLM dataloader.get_dataloaders, SEDD data.get_dataloaders): validation
# for WikiText, PTB and Scientific Papers; test for LM1B and AG News (no validation split); LAMBADA
# is OpenAI's test set. Protocols in suite.txt (sedd-eval --protocol): --paper mdlm (default)
# mdlm-wrap (MDLM's get_dataset(wrap=True), the setting of its GPT-2 data configs), --paper sedd:
# sedd (SEDD's get_dataset). Both cut windows per batch of documents, so empty rows are kept as
# documents (one end-of-text token each), as the papers' pipelines keep them. --length L (the
# model's length, default 1024) is written into suite.txt as a comment; a set with fewer tokens than
# one window is reported. Exit 2 for bad arguments or when SRC holds none of the datasets.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SEDD_BIN:-${SEDD_BUILD:-$repo/build}/bin}
usage="usage: zero-shot.sh SRC OUT --tokenizer PATH/tokenizer.json [--paper mdlm|sedd] [--length L] [--only NAME,...] [--np N] [--overwrite]"
die_usage() { echo "zero-shot: error: $*" >&2; echo "$usage" >&2; exit 2; }

src= out= tokenizer= paper=mdlm length=1024 only= np=1 overwrite=()
positional=()
while (($#)); do
  case $1 in
    --tokenizer|--paper|--length|--only|--np)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --tokenizer) tokenizer=$2 ;; --paper) paper=$2 ;; --length) length=$2 ;; --only) only=$2 ;; --np) np=$2 ;;
      esac
      shift 2 ;;
    --overwrite) overwrite=(--overwrite); shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) die_usage "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done
((${#positional[@]} == 2)) || die_usage "give SRC and OUT (got ${#positional[@]} folder argument(s))"
src=${positional[0]} out=${positional[1]}
[[ -d $src ]] || die_usage "SRC $src: no such folder"
[[ -n $tokenizer ]] || die_usage "--tokenizer PATH/tokenizer.json is required (the papers use GPT-2's)"
[[ $tokenizer == *.json && -f $tokenizer ]] ||
  die_usage "--tokenizer $tokenizer: not a tokenizer.json file (the papers use GPT-2's tokenizer.json)"
[[ $paper == mdlm || $paper == sedd ]] || die_usage "--paper $paper: expected mdlm or sedd"
[[ $length =~ ^[0-9]+$ ]] && ((length >= 3)) || die_usage "--length $length: expected an integer of at least 3"
[[ $np =~ ^[0-9]+$ ]] && ((np >= 1)) || die_usage "--np $np: expected a positive integer"
[[ -x $bin/sedd-prepare ]] || { echo "zero-shot: error: $bin/sedd-prepare not found (build it, or set SEDD_BIN)" >&2; exit 2; }

# name | folders under SRC | split | field | detokenizer
table=(
  "wikitext2|wikitext/wikitext-2-raw-v1 wikitext-2-raw-v1 wikitext2|validation|text|wikitext"
  "wikitext103|wikitext/wikitext-103-raw-v1 wikitext-103-raw-v1 wikitext103|validation|text|wikitext"
  "ptb|ptb_text_only ptb|validation|sentence|ptb"
  "lm1b|lm1b|test|text|lm1b"
  "lambada|lambada_openai lambada|test|text|lambada"
  "ag_news|ag_news|test|text|none"
  "scientific_papers_arxiv|scientific_papers/arxiv scientific_papers_arxiv arxiv|validation|article|scientific_papers"
  "scientific_papers_pubmed|scientific_papers/pubmed scientific_papers_pubmed pubmed|validation|article|scientific_papers"
)
known=" $(for row in "${table[@]}"; do printf '%s ' "${row%%|*}"; done)"
if [[ -n $only ]]; then
  for n in ${only//,/ }; do [[ $known == *" $n "* ]] || die_usage "--only: unknown dataset '$n' (known:$known)"; done
fi
protocol=$([[ $paper == mdlm ]] && echo mdlm-wrap || echo sedd)

# The split's files under folder $1 (split $2; $3: the dataset is one split), one per line in name
# order; Parquet, else Arrow, else JSONL. Paths are matched below the folder only.
split_files() {
  local dir=$1 split=$2 single=$3 kind found
  for kind in parquet arrow jsonl; do
    case $kind in
      parquet) found=$(cd "$dir" && find -L . -maxdepth 3 -type f \( -name "$split-*.parquet" -o -name "$split.parquet" \
                       -o -path "*/$split/*.parquet" \)) ;;
      arrow) found=$(cd "$dir" && find -L . -maxdepth 4 -type f \( -path "./$split/data-*.arrow" -o -name "*-$split.arrow" \
                     -o -name "*-$split-[0-9]*-of-[0-9]*.arrow" \))
             [[ -z $found && $single == 1 ]] && found=$(cd "$dir" && find -L . -maxdepth 1 -type f -name 'data-*.arrow') ;;
      jsonl) found=$(cd "$dir" && find -L . -maxdepth 2 -type f \( -name "$split*.jsonl" -o -name "*_$split.jsonl" \)) ;;
    esac
    if [[ -n $found ]]; then
      LC_ALL=C sort <<<"$found" | while IFS= read -r f; do printf '%s\n' "$dir/${f#./}"; done
      return
    fi
  done
}

[[ $out != *[[:space:]]* ]] || die_usage "OUT $out: white space in the path (suite.txt fields are space-separated)"
created=0
[[ -d $out ]] || created=1
mkdir -p "$out"
out_abs=$(cd "$out" && pwd)
[[ $out_abs != *[[:space:]]* ]] || die_usage "OUT $out_abs: white space in the path (suite.txt fields are space-separated)"
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
suite_lines=() prepared=0
for row in "${table[@]}"; do
  IFS='|' read -r name folders split field detok <<<"$row"
  [[ -z $only || ",$only," == *",$name,"* ]] || continue
  dir=
  for f in $folders; do
    if [[ -d $src/$f ]]; then dir=$src/$f; break; fi
  done
  if [[ -z $dir ]]; then
    echo "[zero-shot] $name: skipped, not in $src (looked for: $folders)"
    continue
  fi
  mapfile -t files < <(split_files "$dir" "$split" "$([[ $name == lambada ]] && echo 1 || echo 0)")
  if ((${#files[@]} == 0)); then
    echo "[zero-shot] $name: skipped, no $split split under $dir (see datasets/zero-shot.sh for the file names)"
    continue
  fi
  echo "[zero-shot] $name: ${#files[@]} file(s) of the $split split, field $field, detokenizer $detok -> $out_abs/$name"
  cmd=("$bin/sedd-prepare" --input "${files[@]}" --field "$field" --detokenizer "$detok" --tokenizer "$tokenizer"
       --out "$out_abs/$name" "${overwrite[@]}")
  ((np > 1)) && cmd=(mpirun --oversubscribe --bind-to none -np "$np" "${cmd[@]}")
  log=$out_abs/.prepare-$name.log
  rc=0
  "${cmd[@]}" >"$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    cat "$log" >&2
    echo "zero-shot: error: sedd-prepare failed for $name (exit $rc); nothing of it is in $out_abs/$name" >&2
    exit "$rc"
  fi
  summary=$(grep -E '^\[prepare\] [0-9]+ documents' "$log" | tail -1 || true)
  rm -f "$log"
  echo "  ${summary#\[prepare\] }"
  tokens=$(sed -E 's/^\[prepare\] [0-9]+ documents, ([0-9]+) tokens.*/\1/' <<<"$summary")
  if [[ $tokens =~ ^[0-9]+$ ]] && ((tokens < length)); then
    echo "[zero-shot] $name: warning: $tokens tokens, fewer than one window of --length $length"
  fi
  suite_lines+=("$name $out_abs/$name/shard-*.h5 $protocol")
  prepared=$((prepared + 1))
done
if ((prepared == 0)); then
  echo "zero-shot: error: $src holds none of the datasets (see datasets/zero-shot.sh for the layout)" >&2
  ((created)) && rmdir "$out_abs" 2>/dev/null || true
  exit 2
fi
{
  echo "# zero-shot sets of the ${paper^^} paper (datasets/zero-shot.sh --paper $paper), tokenizer $tokenizer,"
  echo "# model length $length; evaluate with: sedd-eval --checkpoint RUN --suite $out_abs/suite.txt"
  printf '%s\n' "${suite_lines[@]}"
} >"$out_abs/suite.txt.tmp"
mv "$out_abs/suite.txt.tmp" "$out_abs/suite.txt"
echo "[zero-shot] $prepared dataset(s); suite: $out_abs/suite.txt"
