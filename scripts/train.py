"""Train a recommender LLM: `python scripts/train.py --config configs/sft.py[:preset]`.

Override any config key with `--config.key=value` (e.g. `--config.train.num_steps=50`);
unknown keys are rejected. Re-running the same command resumes from the latest checkpoint in
`--config.workdir`.
"""

from __future__ import annotations

import logging

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
  from recllm_jax.train.loop import train  # after flag parsing: --help stays fast
  train(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
