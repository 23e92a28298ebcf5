"""Example and RecDataset: validation, truncation and split access."""

from __future__ import annotations

import pytest

from recllm_jax.data import Catalog, Example, RecDataset


def test_example_requires_targets_and_aligned_metadata():
  with pytest.raises(ValueError, match="example for user 'u' has no targets"):
    Example("u", ("A",), ())
  with pytest.raises(ValueError, match="timestamps has 1 entries but history has 2"):
    Example("u", ("A", "B"), ("C",), timestamps=(1,))
  with pytest.raises(ValueError, match="actions has 3 entries but history has 2"):
    Example("u", ("A", "B"), ("C",), actions=("view",) * 3)


def test_truncated_keeps_the_newest_events_and_their_metadata():
  ex = Example("u", ("A", "B", "C"), ("D",), {"age_band": "25-34"}, (1, 2, 3), ("view", "buy", "view"))
  assert ex.truncated(2) == Example("u", ("B", "C"), ("D",), {"age_band": "25-34"}, (2, 3), ("buy", "view"))
  assert ex.truncated(None) is ex and ex.truncated(3) is ex
  assert Example("u", ("A", "B"), ("C",)).truncated(1) == Example("u", ("B",), ("C",))


def test_rec_dataset_split_and_repr():
  train, valid = [Example("u", ("A",), ("B",))], [Example("u", ("A", "B"), ("C",))]
  ds = RecDataset(Catalog(), train=train, valid=valid, test=[], skipped=2)
  assert ds.split("train") is train and ds.split("valid") is valid and ds.split("test") == []
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    ds.split("dev")
  assert repr(ds) == "RecDataset(Catalog(0 items, 0 unique titles), train=1, valid=1, test=0, skipped=2)"
