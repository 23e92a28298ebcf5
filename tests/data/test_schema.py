"""Example and RecDataset: validation, truncation, split access and history-item dropout."""

from __future__ import annotations

import numpy as np
import pytest

from recllm_jax.data import Catalog, Example, RecDataset
from recllm_jax.data.schema import drop_history_items


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


class FixedDraws:
  """A stand-in `np.random.Generator` whose `random(n)` returns the given draws."""

  def __init__(self, draws):
    self.draws = np.asarray(draws, dtype=float)

  def random(self, n):
    assert n == len(self.draws)
    return self.draws


def test_drop_history_items_drops_exactly_the_draws_below_the_rate():
  ex = Example("u", ("A", "B", "C", "D"), ("E",), timestamps=(1, 2, 3, 4), actions=("v", "b", "v", "b"))
  dropped = drop_history_items(ex, FixedDraws([0.1, 0.9, 0.2, 0.5]), rate=0.3)
  assert dropped == Example("u", ("B", "D"), ("E",), timestamps=(2, 4), actions=("b", "b"))
  # Nothing below the rate (or rate 0): the example itself.
  assert drop_history_items(ex, FixedDraws([0.5] * 4), rate=0.3) is ex
  assert drop_history_items(ex, np.random.default_rng(0), rate=0.0) is ex
  # Every item drawn for dropping: the newest history item stays, with the targets.
  assert drop_history_items(ex, FixedDraws([0.0] * 4), rate=0.3) == Example(
      "u", ("D",), ("E",), timestamps=(4,), actions=("b",))


def test_drop_history_items_rate_is_the_expected_share():
  ex = Example("u", tuple(f"i{k}" for k in range(100)), ("t",))
  rng = np.random.default_rng(0)
  kept = np.mean([len(drop_history_items(ex, rng, rate=0.25).history) for _ in range(200)])
  assert 73 < kept < 77  # 75 expected; the sd of the mean is ~0.3
