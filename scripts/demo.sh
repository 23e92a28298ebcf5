#!/usr/bin/env bash
# The offline demo: the whole pipeline on the built-in synthetic data, no file from outside the
# repo, a few minutes on a 2-core CPU:
#   bash scripts/demo.sh [OUT_DIR]          (default workdirs/demo)
# SFT (configs/sft.py:tiny) -> GRPO (configs/grpo.py:tiny) -> evaluation on the test split against
# the popularity, item-transition and SASRec baselines -> the results table, training curves
# (OUT/sft/*.png, OUT/grpo/*.png), OUT/results.png and three example users (recent history, our
# top-5, the true next item). Same choices as scripts/reproduce.sh (direct targets, beam
# rollouts); the synthetic data is generated once into OUT/sft/data and shared by every step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-workdirs/demo}"
PYTHON="${PYTHON:-python}"
K="${K:-20}"
mkdir -p "$OUT"
start=$SECONDS
stage() { echo; echo "=== [$(( SECONDS - start ))s] $*"; }

DATA=(--config.data.format=synthetic "--config.data.dir=$OUT/sft/data"
      --config.data.prompt.target_format=direct)

stage "SFT -> $OUT/sft (synthetic data generated into $OUT/sft/data)"
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

stage "baselines on test"
"$PYTHON" scripts/baselines.py --config.data.format=synthetic "--config.data.dir=$OUT/sft/data" \
  "--config.workdir=$OUT/baselines" --split test

stage "results"
"$PYTHON" scripts/plot.py --workdir "$OUT/sft"
"$PYTHON" scripts/plot.py --workdir "$OUT/grpo"
"$PYTHON" scripts/results_table.py --out "$OUT" --data_dir "$OUT/sft/data" \
  --data_format synthetic --model "sft=$OUT/sft/eval_test.json" \
  --model "grpo=$OUT/grpo/eval_test.json" --baselines "$OUT/baselines/baselines_test.json" \
  --title "synthetic demo, test" --examples 3 --predictions "$OUT/grpo/predictions_test.jsonl"
echo "demo.sh: done in $(( SECONDS - start ))s -> $OUT"
