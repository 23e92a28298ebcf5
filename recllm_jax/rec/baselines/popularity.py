"""Most-popular-items baseline: the floor every sequential recommender must clear.

Popularity counts how often an item was the *next* item (a target) in the training examples.
Readers emit one example per position of a user's sequence (every prefix predicts the next
item), so each training interaction is counted exactly once this way; counting histories too
(as :func:`recllm_jax.data.popularity` does, for grounding and novelty) would count an early
event once per later prefix. Ties fall back to that history-inclusive count, then catalog order,
so items that only ever start a sequence still rank above never-seen ones and the ranking is
deterministic.

The published Amazon-2018 protocol ranks the full catalog without removing the user's history
(re-purchases are real targets: ink, paper, tape), so ``exclude_history`` defaults to off.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

from recllm_jax.data import Catalog, Example, popularity

__all__ = ["PopularityRecommender", "fill_ranking", "target_counts"]


def target_counts(examples: Iterable[Example]) -> collections.Counter[str]:
  """How often each item id is a target of ``examples`` (one count per interaction)."""
  counts: collections.Counter[str] = collections.Counter()
  for ex in examples:
    counts.update(ex.targets)
  return counts


@dataclasses.dataclass(frozen=True)
class PopularityRecommender:
  """Recommends the same most-popular items to everyone.

  ``ranking`` holds every catalog id, most popular first.
  """

  ranking: tuple[str, ...]
  exclude_history: bool = False

  @classmethod
  def fit(cls, train: Sequence[Example], catalog: Catalog, *, exclude_history: bool = False
          ) -> PopularityRecommender:
    targets, seen = target_counts(train), popularity(train)
    order = {item.item_id: i for i, item in enumerate(catalog)}
    ranking = sorted(order, key=lambda i: (-targets[i], -seen[i], order[i]))
    return cls(ranking=tuple(ranking), exclude_history=exclude_history)

  def recommend(self, examples: Sequence[Example], k: int) -> list[list[str]]:
    """Top-``k`` ids per example, best first."""
    if not self.exclude_history:
      top = list(self.ranking[:k])
      return [list(top) for _ in examples]
    return [fill_ranking([], self.ranking, k, skip=frozenset(ex.history)) for ex in examples]


def fill_ranking(ranked: list[str], candidates: Iterable[str], k: int, skip: frozenset[str] = frozenset()
         ) -> list[str]:
  """Append ``candidates`` not yet in ``ranked`` (nor in ``skip``) until it has ``k`` ids."""
  present = set(ranked) | skip
  for item_id in candidates:
    if len(ranked) >= k:
      break
    if item_id not in present:
      ranked.append(item_id)
      present.add(item_id)
  return ranked
