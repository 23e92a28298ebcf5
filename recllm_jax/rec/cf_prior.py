"""Collaborative-filtering priors over the catalog, for CF-guided decoding (D3, Bao et al. 2024).

A title-generating LLM trained on few examples knows titles but little about which item follows
which; the baselines know exactly that. D3 mixes a CF model's score into the LLM's constrained
beam search (`recllm_jax.decoding.beam_search(prior=..., prior_weight=...)`), so each example
needs a log-probability for every catalog item. This module turns the fitted baselines of
`recllm_jax.rec.baselines` (fitted on the training split exactly as ``scripts/baselines.py``
fits them) into such distributions:

* ``markov``: p(next | last history item) from the transition counts, mixed with popularity;
  rows whose last item has no recorded successor (or no history) fall back to popularity.
* ``sasrec``: the softmax of SASRec's catalog scores, mixed with popularity.
* ``mix``: the average of the two distributions above.

Popularity is add-one smoothed target counts, and every distribution is
``(1 - smoothing) * p_model + smoothing * p_pop``, so every item has a finite log-probability
(an item with zero CF mass would otherwise be unreachable in the beam).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from recllm_jax.data import Example, RecDataset
from recllm_jax.errors import ConfigError
from recllm_jax.rec.baselines.markov import transition_counts
from recllm_jax.rec.baselines.popularity import target_counts
from recllm_jax.rec.baselines.run import fit_baseline
from recllm_jax.rec.baselines.sasrec import SASRecConfig

__all__ = ["CF_MODELS", "CFPrior", "fit_prior", "popularity_probs"]

CF_MODELS = ("markov", "sasrec", "mix")


@dataclasses.dataclass(frozen=True)
class CFPrior:
  """A fitted CF prior: ``prior(examples)`` -> ``[N, I]`` float64 log-probs, catalog order.

  ``item_ids[j]`` is column j (the catalog's item order, the order `ItemTrie.from_catalog`
  numbers items in); rows sum to 1 in probability.
  """

  name: str
  item_ids: tuple[str, ...]
  probs: Callable[[Sequence[Example]], np.ndarray]  # examples -> [N, I] probabilities

  def __call__(self, examples: Sequence[Example]) -> np.ndarray:
    with np.errstate(divide="ignore"):
      return np.log(self.probs(examples))  # [N, I]

  def recommend(self, examples: Sequence[Example], k: int) -> list[list[str]]:
    """Top-``k`` ids per example by the prior alone (ties: catalog order): the CF-only ablation."""
    probs = self.probs(examples)  # [N, I]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, len(self.item_ids))]  # [N, k]
    return [[self.item_ids[j] for j in row] for row in top]


def popularity_probs(train: Sequence[Example], item_ids: Sequence[str]) -> np.ndarray:
  """[I] add-one smoothed distribution of training targets (the popularity baseline's counts)."""
  counts = target_counts(train)
  p = np.array([counts[i] for i in item_ids], np.float64) + 1.0
  return p / p.sum()


def _markov_probs(train: Sequence[Example], item_ids: Sequence[str], pop: np.ndarray,
                  smoothing: float) -> Callable[[Sequence[Example]], np.ndarray]:
  column = {item_id: j for j, item_id in enumerate(item_ids)}
  # successors[i] = (columns [S], p [S]) of the items that followed item i in training.
  successors = {}
  for item, nexts in transition_counts(train).items():
    cols = np.array([column[j] for j in nexts], np.int64)
    counts = np.array(list(nexts.values()), np.float64)
    successors[item] = (cols, counts / counts.sum())

  def probs(examples: Sequence[Example]) -> np.ndarray:
    out = np.repeat(pop[None], len(examples), axis=0)  # [N, I]
    for row, ex in enumerate(examples):
      if ex.history and ex.history[-1] in successors:
        cols, p = successors[ex.history[-1]]
        out[row] *= smoothing
        out[row, cols] += (1.0 - smoothing) * p
    return out

  return probs


def _sasrec_probs(model, pop: np.ndarray, smoothing: float
                  ) -> Callable[[Sequence[Example]], np.ndarray]:
  def probs(examples: Sequence[Example]) -> np.ndarray:
    scores = np.asarray(model.scores(examples), np.float64)  # [N, I]
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (1.0 - smoothing) * scores / scores.sum(axis=1, keepdims=True) + smoothing * pop

  return probs


def fit_prior(name: str, dataset: RecDataset, *, smoothing: float = 0.1,
              sasrec: SASRecConfig = SASRecConfig(), progress: bool = False) -> CFPrior:
  """The CF prior ``name`` (one of `CF_MODELS`) fitted on ``dataset.train``.

  SASRec is fitted by `recllm_jax.rec.baselines.fit_baseline` (early stopping on
  ``dataset.valid``), with the ``sasrec`` settings of ``configs/baselines.py``.
  """
  if name not in CF_MODELS:
    raise ConfigError(f"unknown CF prior {name!r}; expected one of {list(CF_MODELS)}")
  if not 0.0 < smoothing <= 1.0:
    raise ConfigError(f"CF prior smoothing must be in (0, 1], got {smoothing}: 0 leaves items "
                      "without CF mass unreachable")
  item_ids = tuple(item.item_id for item in dataset.catalog)
  pop = popularity_probs(dataset.train, item_ids)  # [I]
  parts = []
  if name in ("markov", "mix"):
    parts.append(_markov_probs(dataset.train, item_ids, pop, smoothing))
  if name in ("sasrec", "mix"):
    model = fit_baseline("sasrec", dataset, sasrec=sasrec, progress=progress)
    parts.append(_sasrec_probs(model, pop, smoothing))
  if len(parts) == 1:
    return CFPrior(name, item_ids, parts[0])
  return CFPrior(name, item_ids, lambda examples: sum(p(examples) for p in parts) / len(parts))
