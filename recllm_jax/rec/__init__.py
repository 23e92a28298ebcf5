"""Recommendation-specific RL pieces: title grounding, GRPO rewards and evaluation metrics.

Pure Python/numpy, run on the host between generation and the policy
update: these modules use no JAX (importing the ``recllm_jax`` package itself does). The baselines (``recllm_jax.rec.baselines``,
whose SASRec uses JAX) are a subpackage imported on demand.
"""

from __future__ import annotations

from recllm_jax.rec.grounding import (
  MATCH_EXACT,
  MATCH_FUZZY,
  MATCH_KINDS,
  MATCH_NORMALIZED,
  GroundedAnswer,
  Grounder,
  fuzzy_key,
  title_tokens,
)
from recllm_jax.rec.metrics import DEFAULT_KS, evaluate_rankings, format_table
from recllm_jax.rec.rewards import (
  REASON_OK,
  REASON_UNKNOWN_ITEM,
  REWARDS,
  BusinessRule,
  RewardContext,
  RewardFn,
  Sample,
  build_samples,
  composite_rewards,
  hit_at_k,
  load_item_ids,
  ndcg_at_k,
  rank_penalties,
  recall_at_k,
  register,
  resolve_reward,
)

__all__ = [
  "DEFAULT_KS",
  "MATCH_EXACT",
  "MATCH_FUZZY",
  "MATCH_KINDS",
  "MATCH_NORMALIZED",
  "REASON_OK",
  "REASON_UNKNOWN_ITEM",
  "REWARDS",
  "BusinessRule",
  "GroundedAnswer",
  "Grounder",
  "RewardContext",
  "RewardFn",
  "Sample",
  "build_samples",
  "composite_rewards",
  "evaluate_rankings",
  "format_table",
  "fuzzy_key",
  "hit_at_k",
  "load_item_ids",
  "ndcg_at_k",
  "rank_penalties",
  "recall_at_k",
  "register",
  "resolve_reward",
  "title_tokens",
]
