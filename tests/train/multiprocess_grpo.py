"""`configs/grpo.py:<preset>` plus a reward that varies on untrained completions (for
tests/train/test_multiprocess.py).

A model trained for a few SFT steps never closes its `<think>` block, so every built-in reward
is the same for every completion: all advantages, losses and gradients would be 0 and a
comparison of two runs would prove nothing. `distinct_chars` rewards the number of distinct
characters in the completion text, which differs between samples.
"""

from __future__ import annotations

import ml_collections

from configs import grpo


def distinct_chars(sample, ctx) -> float:
  """Distinct characters of the completion, / 10 (a reward in about [0, 5])."""
  del ctx
  return len(set(sample.completion)) / 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = grpo.get_config(arg)
  with c.unlocked():
    c.reward_fns.distinct_chars = f"tests.train.multiprocess_grpo:{distinct_chars.__name__}"
    c.rewards.distinct_chars = 1.0
  return c
