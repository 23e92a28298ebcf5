"""CF priors for CF-guided decoding: hand-computed Markov/popularity mixtures, SASRec and mix."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data import Example, RecDataset
from recllm_jax.errors import ConfigError
from recllm_jax.rec.baselines import MarkovRecommender, SASRecConfig
from recllm_jax.rec.cf_prior import fit_prior, popularity_probs

sys.path.insert(0, str(Path(__file__).parent))
from test_baselines import CATALOG, TRAIN  # noqa: E402

# The baselines' toy data. Targets: a 1, b 2, c 2, d 1 (e, f never); last item -> next: a->b,
# b->c, d->b, e->{c, d}, f->a.
DATASET = RecDataset(CATALOG, TRAIN, valid=[Example("u6", ("a",), ("b",))], test=[])


def _ex(*history: str) -> Example:
  return Example("x", tuple(history), ("a",))


POP = np.array([2, 3, 3, 2, 1, 1]) / 12  # add-one smoothed target counts, catalog order


def test_popularity_is_add_one_smoothed_target_counts():
  np.testing.assert_allclose(popularity_probs(TRAIN, "abcdef"), POP)


def test_markov_prior_mixes_the_successors_of_the_last_item_with_popularity():
  prior = fit_prior("markov", DATASET, smoothing=0.5)
  got = np.exp(prior([_ex("a", "e"), _ex("c"), _ex()]))
  want_e = 0.5 * POP + 0.5 * np.array([0, 0, 0.5, 0.5, 0, 0])  # e -> c 1, d 1
  np.testing.assert_allclose(got, [want_e, POP, POP])  # c has no successor; no history
  # The prior alone ranks like the Markov baseline (successors, then popularity).
  examples = [_ex("e"), _ex("f")]
  assert prior.recommend(examples, 4) == MarkovRecommender.fit(TRAIN, CATALOG).recommend(examples, 4)


def test_sasrec_and_mix_priors_are_normalised_and_average():
  cfg = SASRecConfig(embed_dim=8, max_len=4, max_epochs=2, batch_size=2, dropout=0.0)
  examples = [_ex("a", "e"), _ex("d")]
  sasrec = np.exp(fit_prior("sasrec", DATASET, smoothing=0.2, sasrec=cfg)(examples))
  markov = np.exp(fit_prior("markov", DATASET, smoothing=0.2)(examples))
  mix = np.exp(fit_prior("mix", DATASET, smoothing=0.2, sasrec=cfg)(examples))
  np.testing.assert_allclose(sasrec.sum(1), 1.0)
  assert (sasrec >= 0.2 * POP - 1e-12).all()  # the popularity share keeps every item reachable
  np.testing.assert_allclose(mix, (sasrec + markov) / 2)


def test_fit_prior_errors():
  with pytest.raises(ConfigError, match="unknown CF prior"):
    fit_prior("popularity", DATASET)
  with pytest.raises(ConfigError, match="smoothing"):
    fit_prior("markov", DATASET, smoothing=0.0)
