#!/usr/bin/env bash
# Reproduce the LLM-recommender result on an Amazon-2018-format dataset, CPU only:
#   bash scripts/reproduce.sh [DATA_DIR] [OUT_DIR]
# DATA_DIR defaults to ../shared/data/amazon18/Office_Products (relative to the repo root), OUT_DIR
# to workdirs/reproduce. Run from an activated environment (`pip install -e .` done).
#
# Pipeline: SFT a small random-init Qwen2 (configs/sft.py:tiny, tokenizer trained on the catalog,
# training examples rebuilt from valid.csv) -> GRPO from that checkpoint (configs/grpo.py:tiny)
# -> evaluate both on test.csv (full catalog, constrained beam search, K=20 beams) -> popularity,
# item-transition and SASRec baselines on the same split -> OUT/results.json, one table with the
# dataset README's published rows beside ours, OUT/results.png.
#
# Why direct targets and beam rollouts: evaluation ranks by constrained beam search over bare
# titles (direct prompts), so SFT trains on direct targets and GRPO rolls out with the same beam
# search (its rewards then score exactly the lists evaluation scores). See docs/results.md.
# Nothing here is dataset-specific: another DATA_DIR in the same format is the only change.
# A fresh OUT_DIR gives a fresh run; an existing one resumes from its checkpoints.
# Environment: PYTHON, K (list length), FORMAT (data.format, default amazon18), TITLE (table
# title), EXAMPLES (print that many example users); scripts/demo.sh sets the last three.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA_DIR="${1:-../shared/data/amazon18/Office_Products}"
OUT="${2:-workdirs/reproduce}"
PYTHON="${PYTHON:-python}"
K="${K:-20}"  # list length and beams; metrics at 1,3,5,10,20 <= K
FORMAT="${FORMAT:-amazon18}"

if [[ "$FORMAT" == amazon18 ]]; then
  for f in items.json valid.csv test.csv; do
    if [[ ! -f "$DATA_DIR/$f" ]]; then
      echo "error: $DATA_DIR/$f not found; DATA_DIR must be an Amazon-2018-format folder" >&2
      exit 2
    fi
  done
fi
mkdir -p "$OUT"
start=$SECONDS
stage() { echo; echo "=== [$(( SECONDS - start ))s] $*"; }

DATA=("--config.data.format=$FORMAT" "--config.data.dir=$DATA_DIR"
      --config.data.prompt.target_format=direct)

stage "SFT -> $OUT/sft"
"$PYTHON" scripts/train.py --config configs/sft.py:tiny "${DATA[@]}" "--config.workdir=$OUT/sft"

stage "GRPO from $OUT/sft -> $OUT/grpo"
"$PYTHON" scripts/train.py --config configs/grpo.py:tiny "${DATA[@]}" --config.grpo.rollout=beam \
  "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo"

stage "evaluate SFT on test"
"$PYTHON" scripts/evaluate.py --config configs/sft.py:tiny "${DATA[@]}" \
  "--config.workdir=$OUT/sft" --split test --k "$K"

stage "evaluate GRPO on test"
"$PYTHON" scripts/evaluate.py --config configs/grpo.py:tiny "${DATA[@]}" \
  "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo" --split test --k "$K"

# CF-guided decoding (D3, docs/evaluation.md): the same checkpoints with a Markov + SASRec prior
# mixed into the beam (weight chosen on Office's valid split); files tagged "cf".
CF=(--cf_model "${CF_MODEL:-mix}" --cf_weight "${CF_WEIGHT:-256}" --tag cf)
stage "evaluate SFT on test, CF-guided"
"$PYTHON" scripts/evaluate.py --config configs/sft.py:tiny "${DATA[@]}" \
  "--config.workdir=$OUT/sft" --split test --k "$K" "${CF[@]}"

stage "evaluate GRPO on test, CF-guided"
"$PYTHON" scripts/evaluate.py --config configs/grpo.py:tiny "${DATA[@]}" \
  "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo" --split test --k "$K" "${CF[@]}"

stage "baselines on test"
"$PYTHON" scripts/baselines.py "--config.data.format=$FORMAT" "--config.data.dir=$DATA_DIR" \
  "--config.workdir=$OUT/baselines" --split test

stage "results"
"$PYTHON" scripts/plot.py --workdir "$OUT/sft"
"$PYTHON" scripts/plot.py --workdir "$OUT/grpo"
"$PYTHON" scripts/results_table.py --out "$OUT" --data_dir "$DATA_DIR" --data_format "$FORMAT" \
  --model "sft=$OUT/sft/eval_test.json" --model "grpo=$OUT/grpo/eval_test.json" \
  --model "sft+cf=$OUT/sft/eval_test_cf.json" --model "grpo+cf=$OUT/grpo/eval_test_cf.json" \
  --model "cf prior alone=$OUT/grpo/eval_test_cf_${CF_MODEL:-mix}.json" \
  --baselines "$OUT/baselines/baselines_test.json" --title "${TITLE:-$(basename "$DATA_DIR"), test}" \
  ${EXAMPLES:+--examples "$EXAMPLES" --predictions "$OUT/grpo/predictions_test.jsonl"}
echo "reproduce.sh: done in $(( SECONDS - start ))s ($DATA_DIR -> $OUT)"
