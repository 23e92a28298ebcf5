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
FORMAT=synthetic TITLE="synthetic demo, test" EXAMPLES=3 CF_MODEL=markov \
  exec bash scripts/reproduce.sh "$OUT/sft/data" "$OUT"
