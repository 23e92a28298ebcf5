"""Baselines: hand-checked popularity and Markov rankings, SASRec training, the baselines script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data import Catalog, Example, Item, generate_synthetic, load_dataset, popularity
from recllm_jax.errors import ConfigError
from recllm_jax.rec.baselines import (
  MarkovRecommender,
  PopularityRecommender,
  SASRecConfig,
  SASRecRecommender,
  encode_histories,
  parse_baselines,
  run_baselines,
  target_counts,
  transition_counts,
)
from recllm_jax.rec.metrics import evaluate_rankings

REPO = Path(__file__).resolve().parents[2]
CATALOG = Catalog([Item(i, f"Item {i}") for i in "abcdef"])
# Targets: b 2, c 2, a 1, d 1. History-inclusive counts break the ties: a 3 > d 2 and b 3 > c 2;
# e (2) and f (1) are never targets. Consecutive pairs: a->b, b->c, d->b, e->c, f->a, e->d.
TRAIN = [
  Example("u1", ("a",), ("b",)),
  Example("u1", ("a", "b"), ("c",)),
  Example("u2", ("d",), ("b",)),
  Example("u3", ("e",), ("c",)),
  Example("u4", ("f",), ("a",)),
  Example("u5", ("e",), ("d",)),
]
POPULARITY_ORDER = ("b", "c", "a", "d", "e", "f")


def _ex(*history: str) -> Example:
  return Example("x", tuple(history), ("a",))


def test_popularity_ranks_by_target_count_then_history_count_then_catalog_order():
  assert target_counts(TRAIN) == {"b": 2, "c": 2, "a": 1, "d": 1}
  model = PopularityRecommender.fit(TRAIN, CATALOG)
  assert model.ranking == POPULARITY_ORDER
  assert model.recommend([_ex("b"), _ex("e")], 3) == [["b", "c", "a"]] * 2  # history kept
  excluding = PopularityRecommender.fit(TRAIN, CATALOG, exclude_history=True)
  assert excluding.recommend([_ex("b", "d")], 3) == [["c", "a", "e"]]


def test_markov_follows_the_last_item_then_backs_off():
  assert transition_counts(TRAIN) == {"a": {"b": 1}, "b": {"c": 1}, "d": {"b": 1}, "e": {"c": 1, "d": 1},
                                      "f": {"a": 1}}
  assert transition_counts([Example("u", ("f", "a"), ("b", "c"))]) == {"a": {"b": 1, "c": 1}}
  model = MarkovRecommender.fit(TRAIN, CATALOG)
  assert model.successors["e"] == ("c", "d")  # tie: popularity order
  # e's successors, then popularity; c has no successors: pure popularity (history not removed).
  assert model.recommend([_ex("f", "e"), _ex("c")], 4) == [["c", "d", "b", "a"], ["b", "c", "a", "d"]]
  # backoff=2 consults f's successors (a) before popularity.
  backed_off = MarkovRecommender.fit(TRAIN, CATALOG, backoff=2)
  assert backed_off.recommend([_ex("f", "e")], 4) == [["c", "d", "a", "b"]]
  with pytest.raises(ValueError, match="backoff"):
    MarkovRecommender.fit(TRAIN, CATALOG, backoff=0)


def test_encode_histories_left_pads_and_keeps_the_newest_items():
  index = {i: n + 1 for n, i in enumerate("abcdef")}
  seqs = encode_histories([_ex("a", "b", "c"), _ex("a"), _ex()], index, max_len=2)
  np.testing.assert_array_equal(seqs, [[2, 3], [0, 1], [0, 0]])
  assert seqs.dtype == np.int32


def test_sasrec_config_and_fit_errors():
  with pytest.raises(ConfigError, match="sasrec.embed_dim=30 must be a multiple of sasrec.num_heads=4"):
    SASRecConfig(embed_dim=30, num_heads=4)
  with pytest.raises(ConfigError, match="sasrec.dropout"):
    SASRecConfig(dropout=1.0)
  with pytest.raises(ValueError, match="too few training examples"):
    SASRecRecommender.fit(TRAIN[:1], CATALOG, valid=[])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  data_dir = generate_synthetic(tmp_path_factory.mktemp("data"), num_items=60, num_users=60, seed=0)
  return data_dir, load_dataset(data_dir, "synthetic")


# Small enough to compile and train in seconds on a CPU; no early stop, so both fits run alike.
TINY_SASREC = SASRecConfig(embed_dim=32, num_blocks=1, max_len=10, dropout=0.2, batch_size=64,
                           learning_rate=3e-3, max_epochs=20, patience=20, seed=0)


@pytest.fixture(scope="module")
def sasrec(synthetic):
  _, dataset = synthetic
  return SASRecRecommender.fit(dataset.train, dataset.catalog, TINY_SASREC, valid=dataset.valid)


def test_sasrec_learns_beyond_popularity(synthetic, sasrec):
  _, dataset = synthetic
  test, pop = dataset.test, popularity(dataset.train)
  rankings = sasrec.recommend(test, 10)
  assert all(len(r) == len(set(r)) == 10 and all(i in dataset.catalog for i in r) for r in rankings)
  learned = evaluate_rankings(rankings, test, dataset.catalog, pop, ks=(10,))
  baseline = evaluate_rankings(PopularityRecommender.fit(dataset.train, dataset.catalog).recommend(test, 10),
                               test, dataset.catalog, pop, ks=(10,))
  assert learned["hr@10"] > baseline["hr@10"] + 0.1
  # The kept parameters are those of the best validation epoch.
  ndcgs = [row["valid_ndcg@10"] for row in sasrec.history]
  assert len(ndcgs) == TINY_SASREC.max_epochs
  assert sasrec.best_epoch == 1 + int(np.argmax(ndcgs))
  assert ndcgs[-1] > ndcgs[0]


def test_sasrec_is_deterministic_per_seed(synthetic, sasrec):
  _, dataset = synthetic
  again = SASRecRecommender.fit(dataset.train, dataset.catalog, TINY_SASREC, valid=dataset.valid)
  assert again.history == sasrec.history
  np.testing.assert_array_equal(again.scores(dataset.test), sasrec.scores(dataset.test))


def test_parse_baselines():
  assert parse_baselines(" markov, popularity ,markov") == ("markov", "popularity")
  with pytest.raises(ConfigError, match=r"unknown \['pop'\]"):
    parse_baselines("pop,markov")
  with pytest.raises(ConfigError, match="subset"):
    parse_baselines("")


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / "baselines.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO)


def test_script_writes_the_harness_metrics(synthetic, tmp_path):
  data_dir, dataset = synthetic
  expected = run_baselines(dataset, "test", ("popularity", "markov"), ks=(1, 3, 5, 10, 20))
  assert expected["markov"]["hr@10"] > expected["popularity"]["hr@10"]
  done = _cli(f"--config.data.dir={data_dir}", "--config.data.format=jsonl",
              f"--config.workdir={tmp_path}", "--config.baselines=popularity,markov", "--split=test")
  assert done.returncode == 0, done.stderr
  written = json.loads((tmp_path / "baselines_test.json").read_text())
  assert written.keys() == expected.keys()
  for name in expected:
    assert written[name] == pytest.approx(expected[name])
  assert "hr@10" in done.stdout and "markov" in done.stdout
  # The CF models are saved for scripts/evaluate.py --cf_from: no SASRec when it was not run.
  from recllm_jax.rec.cf_prior import load_cf_models
  models = load_cf_models(tmp_path, dataset)
  assert models.sasrec is None
  assert models.transitions == {k: dict(v) for k, v in transition_counts(dataset.train).items()}


@pytest.mark.parametrize("flag, message", [
  ("--config.sasrec.dropot=0.1", "--config.sasrec.dropot=0.1: no such config key"),
  ("--config.baselines=pop", "ConfigError: baselines='pop'"),
])
def test_script_user_errors_are_one_line(synthetic, tmp_path, flag, message):
  data_dir, _ = synthetic
  done = _cli(f"--config.data.dir={data_dir}", f"--config.workdir={tmp_path}", flag)
  assert done.returncode == 2
  assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
  assert message in done.stderr
