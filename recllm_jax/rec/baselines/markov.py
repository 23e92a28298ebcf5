"""Item-to-item transition (first-order Markov) baseline.

On Amazon-style data "what did people buy right after X" is a strong signal (ink after a
printer, refills after a pen), and a recommender that only learned that is what an LLM must
beat before its reasoning counts. Transitions are counted from each training example's last
history item to its targets: readers emit one example per sequence position, so every
consecutive pair of a user's sequence is counted exactly once (counting pairs inside histories
too would count an early pair once per later prefix).

Ranking for an example: the items that followed its last history item, most frequent first;
then, with ``backoff > 1``, the items that followed the previous history items (newest first);
then the popularity ranking, so every list is filled to ``k`` and ties are deterministic.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

from recllm_jax.data import Catalog, Example
from recllm_jax.rec.baselines.popularity import PopularityRecommender, fill_ranking

__all__ = ["MarkovRecommender", "transition_counts"]


def transition_counts(examples: Sequence[Example]) -> dict[str, collections.Counter[str]]:
  """``{item: Counter(next item)}`` over (last history item -> each target) of ``examples``."""
  counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  for ex in examples:
    if ex.history:
      counts[ex.history[-1]].update(ex.targets)
  return dict(counts)


@dataclasses.dataclass(frozen=True)
class MarkovRecommender:
  """Next-item counts from the last history item, backed off to popularity.

  ``successors[item]`` lists the items seen right after ``item`` in training, most frequent
  first (ties: popularity order). ``backoff`` is how many of the newest history items are
  consulted, newest first, before falling back to popularity.
  """

  successors: Mapping[str, tuple[str, ...]]
  fallback: PopularityRecommender
  backoff: int = 1

  def __post_init__(self) -> None:
    if self.backoff < 1:
      raise ValueError(f"backoff must be >= 1, got {self.backoff}")

  @classmethod
  def fit(cls, train: Sequence[Example], catalog: Catalog, *, backoff: int = 1) -> MarkovRecommender:
    fallback = PopularityRecommender.fit(train, catalog)
    rank = {item_id: r for r, item_id in enumerate(fallback.ranking)}
    successors = {
      item: tuple(sorted(nexts, key=lambda i: (-nexts[i], rank[i])))
      for item, nexts in transition_counts(train).items()
    }
    return cls(successors=successors, fallback=fallback, backoff=backoff)

  def recommend(self, examples: Sequence[Example], k: int) -> list[list[str]]:
    """Top-``k`` ids per example, best first."""
    out = []
    for ex in examples:
      ranked: list[str] = []
      for item in reversed(ex.history[-self.backoff:]):
        fill_ranking(ranked, self.successors.get(item, ()), k)
      out.append(fill_ranking(ranked, self.fallback.ranking, k))
    return out
