"""Train a recommender LLM: `python scripts/train.py --config configs/sft.py[:preset]`.

Override any config key with `--config.key=value` (e.g. `--config.train.num_steps=50`);
unknown keys are rejected. Re-running the same command resumes from the latest checkpoint in
`--config.workdir`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Config files may share pieces (`from configs.sft import base_config`), wherever we run from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/sft.py:tiny",
    lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO.
  # Imported after flag parsing so that --help stays fast.
  from recllm_jax.data.errors import DataError
  from recllm_jax.train.loop import NonFiniteLossError, train
  try:
    train(_CONFIG.value)
  except (DataError, NonFiniteLossError, FileNotFoundError) as e:
    # Expected user-facing failures: a clear message, no traceback.
    sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
