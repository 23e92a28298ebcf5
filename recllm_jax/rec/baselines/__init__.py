"""Non-LLM baselines fitted on the same training examples and scored by the same harness.

Each baseline is fitted with ``Cls.fit(dataset.train, dataset.catalog, ...)`` and answers
``recommend(examples, k) -> list[list[str]]`` (top-``k`` item ids per example, best first), the
input :func:`recllm_jax.rec.metrics.evaluate_rankings` takes, so a baseline row and an LLM row
of a results table differ only in the model. ``scripts/baselines.py`` runs all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from recllm_jax.data import Example
from recllm_jax.rec.baselines.markov import MarkovRecommender, transition_counts
from recllm_jax.rec.baselines.popularity import PopularityRecommender, fill_ranking, target_counts
from recllm_jax.rec.baselines.run import BASELINES, fit_baseline, parse_baselines, run_baselines
from recllm_jax.rec.baselines.sasrec import SASRec, SASRecConfig, SASRecRecommender, encode_histories

__all__ = [
  "BASELINES",
  "MarkovRecommender",
  "PopularityRecommender",
  "Recommender",
  "SASRec",
  "SASRecConfig",
  "SASRecRecommender",
  "encode_histories",
  "fill_ranking",
  "fit_baseline",
  "parse_baselines",
  "run_baselines",
  "target_counts",
  "transition_counts",
]


class Recommender(Protocol):
  """What the evaluation harness needs of a fitted recommender."""

  def recommend(self, examples: Sequence[Example], k: int) -> list[list[str]]: ...
