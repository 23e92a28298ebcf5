"""CF priors for CF-guided decoding: hand-computed Markov/popularity mixtures, SASRec and mix;
saved fits load back as the same prior, and only for the data and config they were fitted with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data import Example, RecDataset
from recllm_jax.errors import ConfigError, MissingPathError
from recllm_jax.rec.baselines import MarkovRecommender, SASRecConfig
from recllm_jax.rec.cf_prior import (
  CFModelsMismatch,
  fit_cf_models,
  fit_prior,
  load_cf_models,
  popularity_probs,
  prior_from_models,
  save_cf_models,
)

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


TINY = SASRecConfig(embed_dim=8, max_len=4, max_epochs=3, batch_size=2, dropout=0.0)


def test_saved_then_loaded_models_give_the_prior_of_a_fresh_fit(tmp_path):
  # What scripts/baselines.py saves and scripts/evaluate.py --cf_from loads: the same prior as
  # fitting in place (the same seeded SASRec fit, parameters saved exactly).
  save_cf_models(fit_cf_models(DATASET, sasrec=TINY), tmp_path)
  loaded = load_cf_models(tmp_path, DATASET, sasrec=TINY)
  examples = [_ex("a", "e"), _ex("d"), _ex(), _ex("f", "b", "c")]
  for name in ("markov", "sasrec", "mix"):
    fresh = fit_prior(name, DATASET, smoothing=0.2, sasrec=TINY)
    again = prior_from_models(name, loaded, smoothing=0.2)
    np.testing.assert_allclose(again(examples), fresh(examples), rtol=1e-12, atol=0)
    assert again.recommend(examples, 6) == fresh.recommend(examples, 6)
  # A Markov prior needs no SASRec: a markov-only save (baselines without sasrec) serves it.
  save_cf_models(fit_cf_models(DATASET, sasrec=None), tmp_path / "markov")
  markov = prior_from_models("markov", load_cf_models(tmp_path / "markov", DATASET), smoothing=0.2)
  np.testing.assert_array_equal(markov(examples),
                                fit_prior("markov", DATASET, smoothing=0.2)(examples))


def test_loading_refuses_other_data_another_config_or_a_missing_sasrec(tmp_path):
  save_cf_models(fit_cf_models(DATASET, sasrec=TINY), tmp_path / "fit")
  other = RecDataset(CATALOG, TRAIN[1:], valid=DATASET.valid, test=[])
  with pytest.raises(CFModelsMismatch, match=r"other data: num_train 6 \(saved\) vs 5 \(here\)"):
    load_cf_models(tmp_path / "fit", other, sasrec=TINY)
  reordered = RecDataset(CATALOG, TRAIN[::-1], valid=DATASET.valid, test=[])
  with pytest.raises(CFModelsMismatch, match="other data: train_sha256"):
    load_cf_models(tmp_path / "fit", reordered)
  with pytest.raises(CFModelsMismatch, match=r"another config: max_epochs 3 \(saved\) vs 4"):
    load_cf_models(tmp_path / "fit", DATASET, sasrec=SASRecConfig(
        embed_dim=8, max_len=4, max_epochs=4, batch_size=2, dropout=0.0))
  save_cf_models(fit_cf_models(DATASET, sasrec=None), tmp_path / "markov")
  with pytest.raises(CFModelsMismatch, match="no SASRec"):
    load_cf_models(tmp_path / "markov", DATASET, sasrec=TINY)
  with pytest.raises(MissingPathError, match="no saved CF models"):
    load_cf_models(tmp_path / "nowhere", DATASET)
  with pytest.raises(ConfigError, match="needs SASRec"):
    prior_from_models("mix", load_cf_models(tmp_path / "markov", DATASET))


def test_chunked_prior_gives_the_same_bits_for_any_batches():
  # scripts/evaluate.py hands the beam a chunked prior (SASRec scores 512 rows at a time).
  prior = fit_prior("mix", DATASET, smoothing=0.2, sasrec=TINY)
  examples = [_ex("a", "e"), _ex("d"), _ex(), _ex("f", "b", "c"), _ex("b")]
  chunked = prior.chunked(examples, chunk=2)
  foreign = _ex("a", "e")  # equal, but not one of `examples`: computed directly
  for batch in ([examples[0], examples[1]], [examples[1], examples[2], examples[2]],
                [examples[4], examples[0], foreign], examples):
    np.testing.assert_array_equal(chunked(batch), prior(batch))
  assert chunked.recommend(examples, 3) == prior.recommend(examples, 3)
