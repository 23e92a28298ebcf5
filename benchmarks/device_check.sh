#!/usr/bin/env bash
# The accelerator checks in one short run (about 6 minutes on one H200), for a lent GPU/TPU:
#   1. fused-attention parity against the einsum (tests/models/test_attention.py; on a GPU the
#      cuDNN kernel, in bf16, for training, prefill and the whole model) -> attn_parity.json
#   2. benchmarks/accelerator.py: the 1.5B SFT / rollout / GRPO step beside the transformers
#      anchor, and measured against planned peak memory -> accelerator.json
#
#   bash benchmarks/device_check.sh [OUT_DIR]        # default: $OUT, else ./device_check
#
# Packages missing on the machine travel as wheels in ./.whl (grain, array_record, portpicker,
# ml_collections, tensorboardX; see docs/results.md "Accelerators"): they are installed into
# /tmp/site first. Each part has its own time limit, so a slow part leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${OUT:-device_check}}"
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

echo "=== attention parity"
ATTN_PARITY_JSON="$DEST/attn_parity.json" timeout "${PARITY_SECONDS:-150}" \
  python3 -m pytest tests/models/test_attention.py -q -s -p no:cacheprovider 2>&1 \
  | tee "$DEST/attn_parity.log"

echo "=== accelerator benchmark"
timeout "${BENCH_SECONDS:-300}" python3 benchmarks/accelerator.py --json "$DEST/accelerator.json" \
  2>&1 | tee "$DEST/accelerator.log"
