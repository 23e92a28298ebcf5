"""Offline evaluation metrics over ranked top-K lists, one harness for every recommender.

Every recommender evaluated here (the LLM in any decoding mode, and the popularity, Markov and
SASRec baselines) hands over the same thing: one ranked list of item ids per example, best
first, where an entry is ``None`` or an unknown id when an unconstrained LLM produced a title
that grounds to no catalog item. Scoring all of them with one function on one split keeps the
comparison honest: same targets, same cut-offs, same treatment of invalid and repeated slots.

Accuracy reuses the per-example functions of :mod:`recllm_jax.rec.rewards`
(:func:`~recllm_jax.rec.rewards.hit_at_k`, :func:`~recllm_jax.rec.rewards.ndcg_at_k`,
:func:`~recllm_jax.rec.rewards.recall_at_k`), and diversity/novelty reuse the GRPO rewards'
definitions, so a number logged during training and one reported here mean the same thing.
Definitions are in ``docs/evaluation.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from recllm_jax.data import Catalog, Example
from recllm_jax.rec.rewards import (
  REASON_OK,
  RewardContext,
  Sample,
  diversity_reward,
  hit_at_k,
  ndcg_at_k,
  novelty_reward,
  recall_at_k,
)

__all__ = ["DEFAULT_KS", "TABLE_KEYS", "evaluate_rankings", "format_table"]

DEFAULT_KS = (1, 3, 5, 10, 20)
# What `format_table` shows by default: the published Amazon protocol's columns plus the
# beyond-accuracy ones at 10.
TABLE_KEYS = ("hr@3", "ndcg@3", "hr@5", "ndcg@5", "hr@10", "ndcg@10", "valid_rate", "coverage@10",
              "diversity@10", "novelty@10")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
  ks = tuple(sorted(set(int(k) for k in ks)))
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be non-empty positive cut-offs, got {ks}")
  return ks


def _mean(values: Sequence[float]) -> float:
  return float(np.mean(values)) if values else 0.0


def evaluate_rankings(
  rankings: Sequence[Sequence[str | None]],
  examples: Sequence[Example],
  catalog: Catalog,
  popularity: Mapping[str, int],
  ks: Iterable[int] = DEFAULT_KS,
  *,
  diversity_attributes: Sequence[str] = ("brand", "categories"),
) -> dict[str, float]:
  """Score one ranked list per example against the example's targets.

  ``rankings[i]`` ranks ids for ``examples[i]``, best first; ``None`` or an id missing from
  ``catalog`` is an invalid slot that still occupies its rank. Lists may be shorter than
  ``max(ks)`` (a miss below their end). ``popularity`` must count *training* interactions
  (``recllm_jax.data.popularity(dataset.train)``); it only feeds novelty.

  Returns flat keys, each a mean over examples unless noted:

  * ``hr@k``, ``ndcg@k``, ``recall@k``: accuracy (``ndcg`` with gain ``1/log2(rank+2)``, 0-based
    rank, ideal DCG over ``min(#targets, k)``; with one target ``recall@k == hr@k``);
  * ``valid_rate``: fraction of all returned slots among the first ``max(ks)`` that are catalog
    items, pooled over examples (1.0 when nothing was returned, as nothing was invalid);
  * ``diversity@k``: the ``diversity`` reward (1 - mean pairwise Jaccard of the distinct valid
    items' attributes) averaged over lists with at least two distinct valid items;
  * ``novelty@k``: the ``novelty`` reward (mean normalised self-information) averaged over lists
    with at least one valid item;
  * ``coverage@k``: distinct valid items recommended in any top-k / catalog size (pooled);
  * ``num_examples``.
  """
  ks = _check_ks(ks)
  if len(rankings) != len(examples):
    raise ValueError(f"got {len(rankings)} rankings for {len(examples)} examples; expected one per example")
  if not examples:
    raise ValueError("no examples to evaluate")
  max_k = ks[-1]
  # Invalid slots become None so the reward helpers (which only drop None) see them as ungrounded.
  cleaned = [tuple(i if i is not None and i in catalog else None for i in r[:max_k]) for r in rankings]
  contexts = {k: RewardContext(catalog=catalog, popularity=popularity, k=k,
                               diversity_attributes=tuple(diversity_attributes)) for k in ks}

  out: dict[str, float] = {}
  for k in ks:
    ctx = contexts[k]
    hr, ndcg, recall, diversity, novelty = [], [], [], [], []
    covered: set[str] = set()
    for ranked, ex in zip(cleaned, examples):
      hr.append(hit_at_k(ranked, ex.targets, k))
      ndcg.append(ndcg_at_k(ranked, ex.targets, k))
      recall.append(recall_at_k(ranked, ex.targets, k))
      sample = Sample(example=ex, completion="", titles=(), item_ids=ranked, parse_reason=REASON_OK)
      valid = sample.valid_items(k)
      covered.update(valid)
      if len(valid) >= 2:
        diversity.append(diversity_reward(sample, ctx))
      if valid:
        novelty.append(novelty_reward(sample, ctx))
    out[f"hr@{k}"] = _mean(hr)
    out[f"ndcg@{k}"] = _mean(ndcg)
    out[f"recall@{k}"] = _mean(recall)
    out[f"diversity@{k}"] = _mean(diversity)
    out[f"novelty@{k}"] = _mean(novelty)
    out[f"coverage@{k}"] = len(covered) / len(catalog) if len(catalog) else 0.0
  slots = sum(len(r) for r in cleaned)
  out["valid_rate"] = sum(i is not None for r in cleaned for i in r) / slots if slots else 1.0
  out["num_examples"] = float(len(examples))
  return out


def format_table(results: Mapping[str, Mapping[str, float]], keys: Sequence[str] = TABLE_KEYS) -> str:
  """A fixed-width text table: one row per name in ``results``, one column per key present."""
  keys = [k for k in keys if any(k in r for r in results.values())]
  name_width = max([len("model"), *(len(n) for n in results)])
  widths = [max(len(k), 6) for k in keys]
  lines = ["  ".join([f"{'model':<{name_width}}", *(f"{k:>{w}}" for k, w in zip(keys, widths))])]
  for name, row in results.items():
    cells = [f"{row[k]:>{w}.4f}" if k in row else f"{'-':>{w}}" for k, w in zip(keys, widths)]
    lines.append("  ".join([f"{name:<{name_width}}", *cells]))
  return "\n".join(lines)
