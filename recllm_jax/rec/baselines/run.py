"""Fit the baselines on a dataset's training split and score them on one split.

Shared by ``scripts/baselines.py`` and tests so that the command line only parses flags and
prints; the protocol itself (what is fitted on what, which popularity feeds novelty) lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from recllm_jax.data import RecDataset, popularity
from recllm_jax.data.errors import DataError
from recllm_jax.errors import ConfigError
from recllm_jax.rec.baselines.markov import MarkovRecommender
from recllm_jax.rec.baselines.popularity import PopularityRecommender
from recllm_jax.rec.baselines.sasrec import SASRecConfig, SASRecRecommender
from recllm_jax.rec.metrics import DEFAULT_KS, evaluate_rankings

__all__ = ["BASELINES", "fit_baseline", "parse_baselines", "run_baselines"]

log = logging.getLogger(__name__)

BASELINES = ("popularity", "markov", "sasrec")


def parse_baselines(spec: str | Iterable[str]) -> tuple[str, ...]:
  """``"popularity,markov"`` (or a sequence) -> validated names, in the given order."""
  names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
  names = [n for n in names if n]
  unknown = sorted(set(names) - set(BASELINES))
  if unknown or not names:
    raise ConfigError(f"baselines={spec!r}: expected a comma-separated subset of {list(BASELINES)}"
                      + (f", unknown {unknown}" if unknown else ""))
  return tuple(dict.fromkeys(names))


def fit_baseline(name: str, dataset: RecDataset, *, sasrec: SASRecConfig = SASRecConfig(),
                 markov_backoff: int = 1, exclude_history: bool = False, progress: bool = False):
  """The baseline ``name`` fitted on ``dataset.train`` (SASRec early-stops on ``dataset.valid``)."""
  if name == "popularity":
    return PopularityRecommender.fit(dataset.train, dataset.catalog, exclude_history=exclude_history)
  if name == "markov":
    return MarkovRecommender.fit(dataset.train, dataset.catalog, backoff=markov_backoff)
  if name == "sasrec":
    return SASRecRecommender.fit(dataset.train, dataset.catalog, sasrec, valid=dataset.valid,
                                 progress=progress)
  raise ConfigError(f"unknown baseline {name!r}; expected one of {list(BASELINES)}")


def run_baselines(dataset: RecDataset, split: str, names: Sequence[str] = BASELINES, *,
                  ks: Iterable[int] = DEFAULT_KS, sasrec: SASRecConfig = SASRecConfig(),
                  markov_backoff: int = 1, exclude_history: bool = False,
                  progress: bool = False, fitted: dict[str, Any] | None = None
                  ) -> dict[str, dict[str, float]]:
  """``{name: evaluate_rankings(...)}`` for each baseline, fitted on train, scored on ``split``.

  Novelty uses the training split's popularity (``recllm_jax.data.popularity``), the same counts
  the GRPO novelty reward uses. ``fitted``, when given, receives each fitted model by name, so
  that a caller can keep them (scripts/baselines.py saves SASRec for the CF-guided evaluation
  instead of having it fitted again).
  """
  names = parse_baselines(names)
  ks = tuple(ks)
  examples = dataset.split(split)
  if not examples:
    raise DataError(f"the {split!r} split is empty; nothing to evaluate")
  train_popularity = popularity(dataset.train)
  results: dict[str, dict[str, float]] = {}
  for name in names:
    start = time.perf_counter()
    model = fit_baseline(name, dataset, sasrec=sasrec, markov_backoff=markov_backoff,
                         exclude_history=exclude_history, progress=progress)
    if fitted is not None:
      fitted[name] = model
    fit_end = time.perf_counter()
    rankings = model.recommend(examples, max(ks))
    results[name] = evaluate_rankings(rankings, examples, dataset.catalog, train_popularity, ks)
    log.info("%s: fit %.1fs, evaluate %.1fs on %d %s examples", name, fit_end - start,
             time.perf_counter() - fit_end, len(examples), split)
  return results
