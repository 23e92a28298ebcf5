"""Evaluation harness metrics: hand-computed values on a toy ranking, invalid slots, the table."""

from __future__ import annotations

import math

import pytest

from recllm_jax.data import Catalog, Example, Item
from recllm_jax.rec.metrics import evaluate_rankings, format_table

# Brands make diversity hand-computable: a/b share one, c and d have others.
CATALOG = Catalog([
  Item("a", "Acme Pen", {"brand": "Acme"}),
  Item("b", "Acme Pencil", {"brand": "Acme"}),
  Item("c", "Orbit Stapler", {"brand": "Orbit"}),
  Item("d", "Zeta Lamp", {"brand": "Zeta"}),
  Item("e", "Zeta Bulb", {"brand": "Zeta"}),
  Item("f", "Orbit Staples", {"brand": "Orbit"}),
])
POPULARITY = {"a": 3, "b": 1}  # total 4 + 6 items: novelty(i) = log(10 / (count + 1)) / log(10)
EXAMPLES = [
  Example("u0", ("d",), ("a",)),  # hit at rank 0
  Example("u1", ("d",), ("b",)),  # hit at rank 2, behind an invalid slot
  Example("u2", ("d",), ("f",)),  # miss
]
RANKINGS = [["a", "b", "c"], ["c", None, "b"], ["a", "b", "not-an-item"]]


def _novelty(count: int) -> float:
  return math.log(10 / (count + 1)) / math.log(10)


def test_hand_computed_toy_ranking():
  m = evaluate_rankings(RANKINGS, EXAMPLES, CATALOG, POPULARITY, ks=(1, 3))
  assert m["num_examples"] == 3
  assert m["hr@1"] == pytest.approx(1 / 3)
  assert m["hr@3"] == pytest.approx(2 / 3)
  assert m["ndcg@1"] == pytest.approx(1 / 3)
  assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
  assert m["recall@3"] == pytest.approx(m["hr@3"])  # single targets
  # 9 slots, two invalid (None and an id the catalog lacks).
  assert m["valid_rate"] == pytest.approx(7 / 9)
  # Top-1 lists cover {a, c}; top-3 lists {a, b, c}; of 6 items.
  assert m["coverage@1"] == pytest.approx(2 / 6)
  assert m["coverage@3"] == pytest.approx(3 / 6)
  # Valid top-3 lists: (a, b, c): 1 - (1 + 0 + 0) / 3; (c, b): 1 - 0; (a, b): 1 - 1.
  assert m["diversity@3"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  assert m["diversity@1"] == 0.0  # no list has two items: nothing to average
  assert m["novelty@1"] == pytest.approx((2 * _novelty(3) + _novelty(0)) / 3)
  assert m["novelty@3"] == pytest.approx(
    ((_novelty(3) + _novelty(1) + _novelty(0)) / 3 + (_novelty(0) + _novelty(1)) / 2
     + (_novelty(3) + _novelty(1)) / 2) / 3)
  assert set(m) == {f"{name}@{k}" for name in ("hr", "ndcg", "recall", "diversity", "novelty", "coverage")
                    for k in (1, 3)} | {"valid_rate", "num_examples"}


def test_multi_target_recall_and_ideal_dcg():
  ex = [Example("u", ("d",), ("a", "c"))]
  m = evaluate_rankings([["c", "e", "a"]], ex, CATALOG, POPULARITY, ks=(1, 3))
  assert m["hr@1"] == 1.0
  assert m["recall@1"] == pytest.approx(0.5)
  assert m["recall@3"] == 1.0
  assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_short_lists_miss_below_their_end_and_count_only_returned_slots():
  m = evaluate_rankings([["e"], []], EXAMPLES[:2], CATALOG, POPULARITY, ks=(1, 5))
  assert m["hr@5"] == 0.0
  assert m["valid_rate"] == 1.0  # one slot returned, and it is valid
  assert m["coverage@5"] == pytest.approx(1 / 6)


def test_slots_beyond_the_largest_cutoff_are_ignored():
  m = evaluate_rankings([["c", None, "a"]], EXAMPLES[:1], CATALOG, POPULARITY, ks=(1,))
  assert m["valid_rate"] == 1.0 and m["hr@1"] == 0.0


def test_bad_inputs():
  with pytest.raises(ValueError, match="2 rankings for 3 examples"):
    evaluate_rankings(RANKINGS[:2], EXAMPLES, CATALOG, POPULARITY)
  with pytest.raises(ValueError, match="no examples"):
    evaluate_rankings([], [], CATALOG, POPULARITY)
  with pytest.raises(ValueError, match="positive cut-offs"):
    evaluate_rankings(RANKINGS, EXAMPLES, CATALOG, POPULARITY, ks=(0, 10))


def test_format_table():
  table = format_table({"popularity": {"hr@10": 0.0432, "ndcg@10": 0.0216}, "sasrec": {"hr@10": 0.125}},
                       keys=("hr@10", "ndcg@10", "coverage@10"))
  lines = table.splitlines()
  assert lines[0].split() == ["model", "hr@10", "ndcg@10"]  # a key no row has is dropped
  assert lines[1].split() == ["popularity", "0.0432", "0.0216"]
  assert lines[2].split() == ["sasrec", "0.1250", "-"]
