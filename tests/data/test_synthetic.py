"""Synthetic generator: determinism, format, and learnable sequential structure."""

from __future__ import annotations

import collections
import time

import pytest

from recllm_jax.data import DataError, generate_synthetic, load_dataset
from recllm_jax.data.synthetic import SYNTHETIC_FILES


def test_same_seed_gives_identical_bytes(tmp_path, synthetic_dir):
  start = time.perf_counter()
  other = generate_synthetic(tmp_path / "again", seed=0)
  assert time.perf_counter() - start < 2.0
  for name in SYNTHETIC_FILES:
    assert (other / name).read_bytes() == (synthetic_dir / name).read_bytes(), name
  different = generate_synthetic(tmp_path / "seed1", seed=1)
  assert (different / "interactions.jsonl").read_bytes() != (synthetic_dir / "interactions.jsonl").read_bytes()
  assert not [p for p in other.iterdir() if p.name not in SYNTHETIC_FILES]  # no temp files left


def test_catalog_and_users(synthetic_dir):
  ds = load_dataset(synthetic_dir)
  items = list(ds.catalog)
  assert len(items) == 500
  assert all(set(item.attributes) >= {"brand", "category", "price"} for item in items)
  assert all(isinstance(item.attributes["price"], float) for item in items)
  assert len(ds.catalog.titles()) > 450  # mostly unique titles, a few duplicates as in real data
  tests = ds.test
  with_profile = [ex for ex in tests if ex.profile]
  assert 0.4 < len(with_profile) / len(tests) < 0.8
  assert set(with_profile[0].profile) == {"age_band", "occupation"}
  for ex in tests:
    assert ex.timestamps is not None and list(ex.timestamps) == sorted(ex.timestamps)
    assert ex.actions is not None and set(ex.actions) <= {"purchase", "add_to_cart", "view"}


def test_sequential_patterns_beat_popularity(synthetic_dir):
  """A most-frequent-transition baseline must clearly beat popularity on the valid split."""
  ds = load_dataset(synthetic_dir)
  transitions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  pop: collections.Counter[str] = collections.Counter()
  for ex in ds.train:
    transitions[ex.history[-1]][ex.targets[0]] += 1
    pop[ex.targets[0]] += 1
  top10 = [item for item, _ in pop.most_common(10)]

  def hit10(ranked_for) -> float:
    return sum(ex.targets[0] in ranked_for(ex)[:10] for ex in ds.valid) / len(ds.valid)

  def by_transition(ex):
    ranked = [item for item, _ in transitions[ex.history[-1]].most_common(10)]
    return ranked + [item for item in top10 if item not in ranked]

  pop_hr, trans_hr = hit10(lambda ex: top10), hit10(by_transition)
  assert trans_hr > 0.25
  assert trans_hr > 3 * pop_hr


def test_load_dataset_generates_synthetic(tmp_path, synthetic_dir):
  target = tmp_path / "cache" / "synthetic"
  ds = load_dataset(target, "synthetic")
  assert (target / "catalog.jsonl").read_bytes() == (synthetic_dir / "catalog.jsonl").read_bytes()
  again = load_dataset(target, "synthetic")  # already there: read, not regenerated
  assert again.train == ds.train
  other = load_dataset(tmp_path / "seed3", "synthetic", seed=3)
  assert other.train != ds.train


def test_synthetic_refuses_foreign_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(DataError, match="refusing to generate"):
    load_dataset(tmp_path, "synthetic")


def test_generator_arguments(tmp_path):
  ds = load_dataset(generate_synthetic(tmp_path, num_items=30, num_users=5, min_length=4, max_length=4))
  assert len(ds.catalog) == 30 and len(ds.test) == 5 and len(ds.train) == 5
  with pytest.raises(ValueError, match="num_items"):
    generate_synthetic(tmp_path / "x", num_items=3)
