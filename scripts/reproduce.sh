#!/usr/bin/env bash
# Reproduce the LLM-recommender result on an Amazon-2018-format dataset, CPU only:
#   bash scripts/reproduce.sh [DATA_DIR] [OUT_DIR]
# DATA_DIR defaults to ../shared/data/amazon18/Office_Products (relative to the repo root), OUT_DIR
# to workdirs/reproduce. Run from an activated environment (`pip install -e .` done).
#
# Pipeline (ITEM_FORMAT=sid, the default): semantic IDs for the catalog (SIDS=built, the default:
# OUT/sids.tsv from scripts/build_sids.py, text + co-occurrence in the training split; SIDS=data:
# DATA_DIR's own, sids.tsv or an amazon18 info.txt or a sid field in catalog.jsonl, built into
# OUT/sids.tsv only where it has none) -> SFT of a small random-init Qwen2 that writes items as
# SIDs (configs/sft.py:office) -> GRPO from that checkpoint with beam rollouts
# (configs/grpo.py:minionerec, MiniOneRec's recipe, chosen on valid rows in docs/grpo.md;
# GRPO_PRESET=office for the plain one) -> evaluate both on test.csv (full catalog, constrained beam search,
# K=20 beams) -> popularity, item-transition and SASRec baselines on the same split (which also
# save the fitted CF models) -> CF-guided evaluation of both (the saved Markov + SASRec prior
# mixed into the beam) -> OUT/results.json, one table with the dataset README's published rows
# beside ours, OUT/results.png, OUT/stage_times.json.
#
# ITEM_FORMAT=title runs the earlier title pipeline: configs/sft.py:tiny and configs/grpo.py:tiny
# with direct targets (--config.data.prompt.target_format=direct) and beam rollouts
# (--config.grpo.rollout=beam), items written as their titles.
#
# Why direct targets and beam rollouts: evaluation ranks by constrained beam search over bare
# items (direct prompts), so SFT trains on direct targets and GRPO rolls out with the same beam
# search (its rewards then score exactly the lists evaluation scores). See docs/results.md.
# Why the baselines run before the CF-guided evaluations: they fit SASRec (minutes on Office) and
# save it with the Markov counts in OUT/baselines; both CF-guided evaluations load that fit
# (scripts/evaluate.py --cf_from) instead of fitting it again, and refuse it if the data differ.
# Nothing here is dataset-specific: another DATA_DIR in the same format is the only change.
# A fresh OUT_DIR gives a fresh run; an existing one resumes from its checkpoints (evaluations
# and baselines run again).
#
# Environment:
#   PYTHON       interpreter (default python)
#   ITEM_FORMAT  sid (default) | title: how items are written (data.item_format)
#   SIDS         built (default) | data: the sid pipeline's SIDs (above; docs/results.md)
#   K            list length and beams (default 20; metrics at 1,3,5,10,20 <= K)
#   FORMAT       data.format (default amazon18; scripts/demo.sh sets synthetic)
#   SFT_STEPS    SFT train.num_steps (default: the preset's, 600 for sid, 300 for title)
#   SFT_LR       SFT train.lr (default: the preset's, 1.5e-3 for sid, 3e-3 for title)
#   GRPO_STEPS   GRPO train.num_steps (default: the preset's, 40 for sid, 30 for title)
#   GRPO_LR      GRPO train.lr (default: the preset's, 3e-5 for sid, 2e-4 for title)
#   GRPO_PRESET  configs/grpo.py preset of the sid GRPO stage: minionerec (default) | office
#   CF_MODEL     CF prior of the CF-guided rows: mix (default) | markov | sasrec
#   CF_WEIGHT    its weight in the beam score (default 256, chosen on Office's valid split)
#   TITLE        title of the results table; EXAMPLES: print that many example users
#   RUN_COMMAND  the command named in the last line (scripts/demo.sh sets its own)
# The results stage (scripts/results_table.py) prints the table, what it shows (the winners of
# HR@10 and NDCG@10, the model alone against them, GRPO vs its SFT, the CF-guided rows vs the
# prior alone), EXAMPLES users of the best of our rows and the next steps (your own users, your
# own data, the Amazon data). Then one line of stage wall times (also OUT/stage_times.json,
# {"stage": seconds, ..., "total": seconds}) and a last line naming the command and the outputs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN_COMMAND="${RUN_COMMAND:-bash scripts/reproduce.sh${*:+ $*}}"
DATA_DIR="${1:-../shared/data/amazon18/Office_Products}"
OUT="${2:-workdirs/reproduce}"
PYTHON="${PYTHON:-python}"
ITEM_FORMAT="${ITEM_FORMAT:-sid}"
K="${K:-20}"  # list length and beams; metrics at 1,3,5,10,20 <= K
FORMAT="${FORMAT:-amazon18}"
CF_MODEL="${CF_MODEL:-mix}"

case "$ITEM_FORMAT" in
  sid) SFT_CONFIG=configs/sft.py:office GRPO_CONFIG="configs/grpo.py:${GRPO_PRESET:-minionerec}"
       EXTRA=() GRPO_EXTRA=() ;;
  title) SFT_CONFIG=configs/sft.py:tiny GRPO_CONFIG=configs/grpo.py:tiny
         EXTRA=(--config.data.prompt.target_format=direct) GRPO_EXTRA=(--config.grpo.rollout=beam) ;;
  *) echo "error: ITEM_FORMAT=$ITEM_FORMAT; expected sid or title" >&2; exit 2 ;;
esac

if [[ "$FORMAT" == amazon18 ]]; then
  missing=()
  for f in items.json valid.csv test.csv; do
    [[ -f "$DATA_DIR/$f" ]] || missing+=("$f")
  done
  if (( ${#missing[@]} )); then
    printf -v problem '%s, ' "${missing[@]}"
    if [[ -d "$DATA_DIR" ]]; then problem="$DATA_DIR has no ${problem%, }"
    else problem="$DATA_DIR does not exist"; fi
    cat >&2 <<EOF
error: $problem. DATA_DIR must be an Amazon-2018-format folder (docs/data.md, Amazon Reviews 2018):
  items.json  the catalog: {"<item_id>": {"title", "description", "brand", "categories"}}
  valid.csv   rows user_id, history_item_id, item_id, ... (training is rebuilt from it)
  test.csv    the same columns, later in time: the test split
  info.txt    optional: the items' semantic IDs (<sid> TAB <title> TAB <item_id>)
These are the published valid/test splits of the MiniOneRec repository, data/Amazon/<category>/
(e.g. Office_Products: Amazon Reviews 2018 preprocessed as in D3/MiniOneRec). Put one category's
files in a folder and pass it: bash scripts/reproduce.sh DATA_DIR [OUT_DIR]
Your own data: catalog.jsonl + interactions.jsonl, or .parquet (docs/data.md, JSONL format):
  FORMAT=jsonl bash scripts/reproduce.sh YOUR_DIR [OUT_DIR]
No data at hand: bash scripts/demo.sh runs the same pipeline on built-in synthetic data.
EOF
    exit 2
  fi
fi
mkdir -p "$OUT"
start=$SECONDS
STAGE_NAMES=() STAGE_SECONDS=() current="" current_start=0
end_stage() {
  if [[ -n "$current" ]]; then
    STAGE_NAMES+=("$current") STAGE_SECONDS+=($(( SECONDS - current_start )))
  fi
  current=""
}
# stage NAME DESCRIPTION...: closes the previous stage's clock, prints the timing line.
stage() {
  end_stage
  current="$1" current_start=$SECONDS
  shift
  echo; echo "=== [$(( SECONDS - start ))s] $*"
}

SFT_TRAIN=(${SFT_STEPS:+"--config.train.num_steps=$SFT_STEPS"} ${SFT_LR:+"--config.train.lr=$SFT_LR"})
GRPO_TRAIN=(${GRPO_STEPS:+"--config.train.num_steps=$GRPO_STEPS"} ${GRPO_LR:+"--config.train.lr=$GRPO_LR"})

if [[ "$ITEM_FORMAT" == sid ]]; then
  if [[ "$FORMAT" == synthetic ]]; then
    # SIDs are built from the data, so the synthetic data (otherwise generated by the SFT stage)
    # must exist first; the same call the loaders make, with the runs' seed (0).
    "$PYTHON" -c 'import sys; from recllm_jax.data.synthetic import ensure_synthetic
ensure_synthetic(sys.argv[1], seed=0)' "$DATA_DIR"
  fi
  case "${SIDS:-built}" in
    built) own="" ;;
    data)
      if [[ -f "$DATA_DIR/sids.tsv" ]]; then own="$DATA_DIR/sids.tsv"
      elif [[ "$FORMAT" == amazon18 && -f "$DATA_DIR/info.txt" ]]; then own="$DATA_DIR/info.txt"
      elif [[ "$FORMAT" != amazon18 ]] && grep -qs '"sid"' "$DATA_DIR/catalog.jsonl"; then
        own="the sid field of $DATA_DIR/catalog.jsonl"
      else own=""; fi ;;
    *) echo "error: SIDS=$SIDS; expected built or data" >&2; exit 2 ;;
  esac
  if [[ -n "$own" ]]; then
    echo "semantic IDs: the dataset's own ($own)"
  else
    # Written into OUT, never into DATA_DIR, and read by every stage through data.sid_file. Built
    # from the split the runs train on (the presets' data.valid_fraction / valid_holdout).
    stage sids "semantic IDs -> $OUT/sids.tsv"
    "$PYTHON" scripts/build_sids.py --data_dir "$DATA_DIR" --format "$FORMAT" --out "$OUT/sids.tsv"
    EXTRA+=("--config.data.sid_file=$OUT/sids.tsv")
  fi
fi

DATA=("--config.data.format=$FORMAT" "--config.data.dir=$DATA_DIR" "${EXTRA[@]}")

stage sft "SFT -> $OUT/sft"
"$PYTHON" scripts/train.py --config "$SFT_CONFIG" "${DATA[@]}" "${SFT_TRAIN[@]}" \
  "--config.workdir=$OUT/sft"

stage grpo "GRPO from $OUT/sft -> $OUT/grpo"
"$PYTHON" scripts/train.py --config "$GRPO_CONFIG" "${DATA[@]}" "${GRPO_EXTRA[@]}" \
  "${GRPO_TRAIN[@]}" "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo"

stage eval_sft "evaluate SFT on test"
"$PYTHON" scripts/evaluate.py --config "$SFT_CONFIG" "${DATA[@]}" \
  "--config.workdir=$OUT/sft" --split test --k "$K"

stage eval_grpo "evaluate GRPO on test"
"$PYTHON" scripts/evaluate.py --config "$GRPO_CONFIG" "${DATA[@]}" \
  "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo" --split test --k "$K"

stage baselines "baselines on test (and the CF models, saved in $OUT/baselines)"
"$PYTHON" scripts/baselines.py "--config.data.format=$FORMAT" "--config.data.dir=$DATA_DIR" \
  "--config.workdir=$OUT/baselines" --split test

# CF-guided decoding (D3, docs/evaluation.md): the same checkpoints with a Markov + SASRec prior
# mixed into the beam (weight chosen on Office's valid split); files tagged "cf". The prior is
# the baselines' fit, loaded from OUT/baselines (scripts/evaluate.py --cf_from).
CF=(--cf_model "$CF_MODEL" --cf_weight "${CF_WEIGHT:-256}" --cf_from "$OUT/baselines" --tag cf)
stage eval_sft_cf "evaluate SFT on test, CF-guided"
"$PYTHON" scripts/evaluate.py --config "$SFT_CONFIG" "${DATA[@]}" \
  "--config.workdir=$OUT/sft" --split test --k "$K" "${CF[@]}"

stage eval_grpo_cf "evaluate GRPO on test, CF-guided"
"$PYTHON" scripts/evaluate.py --config "$GRPO_CONFIG" "${DATA[@]}" \
  "--config.init_from=$OUT/sft" "--config.workdir=$OUT/grpo" --split test --k "$K" "${CF[@]}"

stage results "results"
"$PYTHON" scripts/plot.py --workdir "$OUT/sft"
"$PYTHON" scripts/plot.py --workdir "$OUT/grpo"
"$PYTHON" scripts/results_table.py --out "$OUT" --data_dir "$DATA_DIR" --data_format "$FORMAT" \
  --model "sft=$OUT/sft/eval_test.json" --model "grpo=$OUT/grpo/eval_test.json" \
  --model "sft+cf=$OUT/sft/eval_test_cf.json" --model "grpo+cf=$OUT/grpo/eval_test_cf.json" \
  --cf_prior "cf prior alone=$OUT/grpo/eval_test_cf_$CF_MODEL.json" \
  --baselines "$OUT/baselines/baselines_test.json" --title "${TITLE:-$(basename "$DATA_DIR"), test}" \
  ${EXAMPLES:+--examples "$EXAMPLES"} --next_steps
end_stage

total=$(( SECONDS - start ))
json="{" times=""
for i in "${!STAGE_NAMES[@]}"; do
  json+="\"${STAGE_NAMES[$i]}\": ${STAGE_SECONDS[$i]}, "
  times+="${times:+, }${STAGE_NAMES[$i]} ${STAGE_SECONDS[$i]}s"
done
echo "$json\"total\": $total}" > "$OUT/stage_times.json"
echo
echo "stage times: $times ($OUT/stage_times.json)"
echo "$RUN_COMMAND: done in $(( total / 60 )) min $(( total % 60 )) s; outputs in $OUT/" \
  "(results.json, results.png; sft/, grpo/, baselines/: checkpoints, curves, predictions)"
