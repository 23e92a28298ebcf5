"""Synthetic generator: determinism, format, and learnable sequential structure."""

from __future__ import annotations

import collections
import json
import logging

import pytest

from recllm_jax.data import DataError, generate_synthetic, load_dataset
from recllm_jax.data import synthetic
from recllm_jax.data.synthetic import META_FILE, SYNTHETIC_FILES

from sample_data import CATALOG_ROWS, make_jsonl_dataset


def test_same_seed_gives_identical_bytes(tmp_path, synthetic_dir):
  other = generate_synthetic(tmp_path / "again", seed=0)
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


def test_metadata_records_every_setting(synthetic_dir):
  meta = json.loads((synthetic_dir / META_FILE).read_text())
  assert meta == {
    "generator": "recllm_jax.data.synthetic", "version": synthetic.GENERATOR_VERSION, "seed": 0,
    "num_items": 500, "num_users": 400, "min_length": 5, "max_length": 16, "profile_fraction": 0.6,
  }


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_changed_seed_regenerates_cached_data(tmp_path, caplog):
  target = tmp_path / "data"
  load_dataset(target, "synthetic", seed=0)
  caplog.clear()
  ds = load_dataset(target, "synthetic", seed=3)
  assert _warnings(caplog) == [f"regenerating synthetic data in {target}: seed 0 -> 3"]
  fresh = generate_synthetic(tmp_path / "seed3", seed=3)
  for name in SYNTHETIC_FILES:
    assert (target / name).read_bytes() == (fresh / name).read_bytes(), name
  assert ds.train == load_dataset(fresh).train

  caplog.clear()
  def stamps():  # a rewrite replaces the file: new inode and mtime
    return {name: ((target / name).stat().st_ino, (target / name).stat().st_mtime_ns) for name in SYNTHETIC_FILES}

  before = stamps()
  load_dataset(target, "synthetic", seed=3)  # up to date: read, not rewritten
  assert _warnings(caplog) == []
  assert stamps() == before


def test_changed_generator_settings_regenerate(tmp_path, caplog):
  target = generate_synthetic(tmp_path / "data", num_items=30, num_users=5)
  caplog.clear()
  generate_synthetic(target, reuse=True)
  assert _warnings(caplog) == [
    f"regenerating synthetic data in {target}: num_items 30 -> 500, num_users 5 -> 400"
  ]
  assert len(load_dataset(target).test) == 400


def test_load_dataset_keeps_custom_sizes_and_follows_seed(tmp_path, caplog):
  target = generate_synthetic(tmp_path / "data", num_items=30, num_users=5)
  caplog.clear()
  ds = load_dataset(target, "synthetic")  # seed 0, as generated: reused as is
  assert _warnings(caplog) == [] and len(ds.catalog) == 30 and len(ds.test) == 5
  ds = load_dataset(target, "synthetic", seed=1)
  assert _warnings(caplog) == [f"regenerating synthetic data in {target}: seed 0 -> 1"]
  fresh = generate_synthetic(tmp_path / "fresh", num_items=30, num_users=5, seed=1)
  assert (target / "interactions.jsonl").read_bytes() == (fresh / "interactions.jsonl").read_bytes()


def test_new_generator_version_regenerates(tmp_path, caplog, monkeypatch):
  target = generate_synthetic(tmp_path / "data", num_items=30, num_users=5)
  monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
  caplog.clear()
  load_dataset(target, "synthetic")
  new = synthetic.GENERATOR_VERSION
  assert _warnings(caplog) == [f"regenerating synthetic data in {target}: version {new - 1} -> {new}"]
  meta = json.loads((target / META_FILE).read_text())
  assert meta["version"] == new and meta["num_items"] == 30


def test_incomplete_or_unreadable_metadata_regenerates(tmp_path, synthetic_dir, caplog):
  target = generate_synthetic(tmp_path / "data")
  (target / "catalog.jsonl").unlink()
  caplog.clear()
  load_dataset(target, "synthetic")
  assert _warnings(caplog) == [f"regenerating synthetic data in {target}: missing catalog.jsonl"]
  assert (target / "catalog.jsonl").read_bytes() == (synthetic_dir / "catalog.jsonl").read_bytes()

  (target / META_FILE).write_text("{truncated")
  caplog.clear()
  load_dataset(target, "synthetic")
  assert _warnings(caplog) == [f"regenerating synthetic data in {target}: unreadable synthetic.json"]
  assert (target / META_FILE).read_bytes() == (synthetic_dir / META_FILE).read_bytes()


def test_synthetic_refuses_foreign_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(DataError, match="refusing to generate"):
    load_dataset(tmp_path, "synthetic")
  with pytest.raises(DataError, match="refusing to generate"):
    generate_synthetic(tmp_path)


def test_synthetic_never_overwrites_user_data(tmp_path):
  root = make_jsonl_dataset(tmp_path / "mine", [{"user_id": "u", "history": ["A", "B", "C", "D"]}])
  original = (root / "catalog.jsonl").read_bytes()
  for generate in (lambda: load_dataset(root, "synthetic"), lambda: generate_synthetic(root)):
    with pytest.raises(DataError) as info:
      generate()
    assert str(info.value).startswith(
      f"{root}: directory has catalog.jsonl and interactions.jsonl but no synthetic.json"
    )
  assert (root / "catalog.jsonl").read_bytes() == original
  assert len(load_dataset(root, "jsonl").catalog) == len(CATALOG_ROWS)


def test_generator_arguments(tmp_path):
  ds = load_dataset(generate_synthetic(tmp_path, num_items=30, num_users=5, min_length=4, max_length=4))
  assert len(ds.catalog) == 30 and len(ds.test) == 5 and len(ds.train) == 5
  with pytest.raises(ValueError, match="num_items"):
    generate_synthetic(tmp_path / "x", num_items=3)
