"""GRPO rewards: hand-computed values, malformed completions, registry and composition."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pytest

from recllm_jax.errors import ConfigError

from recllm_jax.data import Catalog, DataError, Example, Item, RecDataset
from recllm_jax.rec import rewards as R
from recllm_jax.rec.grounding import Grounder

LOG2_3 = math.log2(3)


def _catalog() -> Catalog:
  return Catalog(
    [
      Item("A", "Acme Gel Pen", {"brand": "Acme", "categories": ["Office", "Pens"]}),
      Item("B", "Acme Spiral Notebook", {"brand": "Acme", "categories": ["Office", "Notebooks"]}),
      Item("C", "Orbit Stapler", {"brand": "Orbit", "categories": ["Office", "Staplers"]}),
      Item("D", "Orbit Staples", {"brand": "Orbit", "categories": ["Office", "Staples"]}),
      Item("E", "Zeta Desk Lamp", {"brand": "Zeta", "categories": [["Lighting"]]}),  # nested, as in Amazon
      Item("F", "Acme Plain Notebook"),  # no attributes
    ]
  )


CATALOG = _catalog()
EXAMPLE = Example(user_id="u", history=("B",), targets=("C",))


def _ctx(**kwargs) -> R.RewardContext:
  return R.RewardContext(catalog=CATALOG, popularity=collections.Counter({"A": 3, "B": 1}), **kwargs)


def _sample(ids, *, reason="ok", example=EXAMPLE, rank=0, group=()) -> R.Sample:
  ids = tuple(ids)
  titles = tuple(CATALOG.title(i) if i in CATALOG else "Bogus" for i in ids)
  return R.Sample(
    example=example,
    completion="...",
    titles=titles,
    item_ids=tuple(i if i in CATALOG else None for i in ids),
    parse_reason=reason,
    group_rank=rank,
    group_items=tuple(tuple(i if i in CATALOG else None for i in g) for g in group),
  )


def _call(name: str, sample: R.Sample, ctx: R.RewardContext | None = None) -> float:
  return R.REWARDS[name](sample, ctx or _ctx())


# -------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
  "ranked, k, expected",
  [
    (["C", "A"], 5, 1.0),
    (["A", "B", "C"], 5, 0.5),  # 1 / log2(2 + 2)
    (["A", "C"], 5, 1 / LOG2_3),
    (["A", "B", "D", "E", "F", "C"], 5, 0.0),  # rank 5 is outside K=5
    (["A", None, "C", "C"], 5, 0.5),  # an ungrounded slot still takes rank 1; the repeat earns nothing
    ([], 5, 0.0),
  ],
)
def test_ndcg_single_target(ranked, k, expected):
  assert R.ndcg_at_k(ranked, ("C",), k) == pytest.approx(expected)


def test_metrics_multi_target():
  ranked = ["C", "X", "D"]
  # DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3).
  assert R.ndcg_at_k(ranked, ("C", "D"), 5) == pytest.approx(1.5 / (1 + 1 / LOG2_3))
  assert R.ndcg_at_k(ranked, ("C", "D"), 1) == pytest.approx(1.0)  # IDCG capped at K=1 target
  assert R.recall_at_k(ranked, ("C", "D"), 5) == 1.0
  assert R.recall_at_k(ranked, ("C", "D"), 2) == 0.5
  assert R.recall_at_k(["C", "C"], ("C", "D"), 5) == 0.5
  assert R.hit_at_k(ranked, ("D",), 3) == 1.0
  assert R.hit_at_k(ranked, ("D",), 2) == 0.0


def test_rank_penalties_match_minionerec():
  total = 1 + 1 / LOG2_3 + 1 / 2 + 1 / math.log2(5)  # 2.5616...
  p = R.rank_penalties(4)
  np.testing.assert_allclose(p, [-1 / total, -1 / LOG2_3 / total, -0.5 / total, -1 / math.log2(5) / total])
  assert p.sum() == pytest.approx(-1.0)
  np.testing.assert_allclose(R.rank_penalties(1), [-1.0])
  with pytest.raises(ValueError):
    R.rank_penalties(0)


# -------------------------------------------------------------------------- accuracy rewards


def test_accuracy_rewards_with_k():
  s = _sample(["A", "D", "C"])  # target C at rank 2
  assert _call("hit", s) == 1.0
  assert _call("ndcg", s) == pytest.approx(0.5)
  assert _call("recall", s) == 1.0
  assert _call("hit", s, _ctx(k=2)) == 0.0
  assert _call("ndcg", s, _ctx(k=2)) == 0.0
  assert _call("ndcg", _sample(["C"]), _ctx(k=5)) == 1.0


def test_format_reward():
  assert _call("format", _sample(["C"])) == 1.0
  assert _call("format", _sample(["Bogus"])) == 1.0  # well-formed, just unknown: `invalid` punishes it
  assert _call("format", _sample([], reason="unclosed_think")) == 0.0


# -------------------------------------------------------------------------- rank-aware


def test_rank_aware_penalises_wrong_answers_by_rank():
  group = [["A"], ["C"], [], ["D"]]  # member 1 hits the target, member 2 is malformed
  p = R.rank_penalties(4)
  samples = [
    _sample(items, reason="ok" if items else "no_answer", rank=r, group=group) for r, items in enumerate(group)
  ]
  got = [_call("rank_aware", s) for s in samples]
  np.testing.assert_allclose(got, [p[0], 0.0, p[2], p[3]])
  # Ranks need not follow group order: a wrong answer ranked first pays most.
  assert _call("rank_aware", _sample(["D"], rank=0, group=group)) == pytest.approx(p[0])


def test_rank_aware_is_zero_without_a_hit_in_group():
  group = [["A"], ["D"]]
  assert [_call("rank_aware", _sample(g, rank=r, group=group)) for r, g in enumerate(group)] == [0.0, 0.0]
  assert _call("rank_aware", _sample(["A"])) == 0.0  # no group given: a group of one


def test_rank_aware_uses_hit_at_k():
  group = [["A", "C"], ["D"]]
  assert _call("rank_aware", _sample(["D"], rank=1, group=group)) == pytest.approx(R.rank_penalties(2)[1])
  # With K=1 nobody hits, so nobody is penalised.
  assert _call("rank_aware", _sample(["D"], rank=1, group=group), _ctx(k=1)) == 0.0


# -------------------------------------------------------------------------- rank_aware vs ndcg_rule

# MiniOneRec's penalties for G = 4, by hand: gains 1/log2(r + 2) = 1, 0.63093, 0.5, 0.43068,
# sum 2.56161; penalty_r = -gain_r / sum.
P4 = [-0.390380, -0.246302, -0.195190, -0.168128]


@pytest.mark.parametrize(
  "group, rank_aware, ndcg_rule, rule",
  [
    # Target C at rank 0: every wrong beam pays its rank's penalty, the hit 0.
    ([["C"], ["A"], ["D"], ["E"]], [0.0, P4[1], P4[2], P4[3]], [0.0, P4[1], P4[2], P4[3]], [1, 0, 0, 0]),
    # Target at rank 3: the confident wrong beam at rank 0 pays most.
    ([["A"], ["D"], ["E"], ["C"]], [P4[0], P4[1], P4[2], 0.0], [P4[0], P4[1], P4[2], 0.0], [0, 0, 0, 1]),
    # No hit in the group: all 0 (no signal from either).
    ([["A"], ["D"], ["E"], ["F"]], [0.0] * 4, [0.0] * 4, [0, 0, 0, 0]),
    # Where they differ: a two-item answer holding the target is a Hit@K hit for rank_aware,
    # but not MiniOneRec's exact answer, so ndcg_rule sees a group without a hit.
    ([["A", "C"], ["D"], ["E"], ["F"]], [0.0, P4[1], P4[2], P4[3]], [0.0] * 4, [0, 0, 0, 0]),
  ],
)
def test_rank_aware_and_ndcg_rule_by_hand(group, rank_aware, ndcg_rule, rule):
  samples = [_sample(items, rank=r, group=group) for r, items in enumerate(group)]
  np.testing.assert_allclose([_call("rank_aware", s) for s in samples], rank_aware, atol=1e-6)
  np.testing.assert_allclose([_call("ndcg_rule", s) for s in samples], ndcg_rule, atol=1e-6)
  assert [_call("rule", s) for s in samples] == rule


def test_ndcg_rule_reads_the_explicit_rank_and_penalises_malformed():
  group = [["C"], [], ["A"], ["D"]]  # member 1 is malformed: a wrong answer
  samples = [_sample(g, reason="ok" if g else "no_answer", rank=r, group=group) for r, g in enumerate(group)]
  np.testing.assert_allclose([_call("ndcg_rule", s) for s in samples], [0.0, P4[1], P4[2], P4[3]], atol=1e-6)
  # The rank is the sample's field, not its position: row 2 ranked first pays rank 0's penalty.
  assert _call("ndcg_rule", _sample(["A"], rank=0, group=group)) == pytest.approx(P4[0], abs=1e-6)
  assert _call("ndcg_rule", _sample(["A"])) == 0.0  # a group of one without a hit
  assert _call("rule", _sample(["C"], reason="unclosed_think")) == 0.0


SIDS = {"A": "<a_1><b_2><c_3>", "B": "<a_1><b_2><c_4>", "C": "<a_1><b_5><c_3>",
        "D": "<a_7><b_2><c_3>", "E": "<a_1><b_2><c_8><d_0>", "F": "<a_1><b_2><c_8><d_1>"}


@pytest.mark.parametrize("answer,targets,expected", [
    ("A", ("A",), 1.0),        # the target itself
    ("B", ("A",), 2 / 3),      # first two codes shared
    ("C", ("A",), 1 / 3),      # the first code only: a match after a mismatch earns nothing
    ("D", ("A",), 0.0),        # a different first code, however much of the rest matches
    ("E", ("F",), 3 / 4),      # a collision level: shares 3 of the target's 4 codes
    ("A", ("E",), 2 / 4),      # a shorter answer: 2 of the target's 4 codes
    ("D", ("C", "B"), 0.0),
    ("C", ("D", "B"), 1 / 3),  # the best over targets
])
def test_sid_prefix_by_hand(answer, targets, expected):
  from recllm_jax.data.items import SidCodec

  ctx = _ctx(codec=SidCodec(CATALOG, SIDS))
  example = Example(user_id="u", history=("B",), targets=targets)
  assert _call("sid_prefix", _sample([answer], example=example), ctx) == pytest.approx(expected)


def test_sid_prefix_is_zero_without_sids_or_a_grounded_answer():
  from recllm_jax.data.items import SidCodec

  assert _call("sid_prefix", _sample(["C"])) == 0.0  # no codec: the title path
  ctx = _ctx(codec=SidCodec(CATALOG, SIDS))
  assert _call("sid_prefix", _sample(["Bogus"]), ctx) == 0.0
  assert _call("sid_prefix", _sample([], reason="no_answer"), ctx) == 0.0
  assert _call("sid_prefix", _sample(["C"]), ctx) == 1.0


def test_ranks_from_scores_rank_each_group_by_descending_score():
  scores = [-1.0, -3.0, -0.5, -3.0, 0.0, -2.0]  # two groups of 3
  np.testing.assert_array_equal(R.ranks_from_scores(scores, 3), [1, 2, 0, 2, 0, 1])
  # A tie (rows 1 and 3) keeps row order.
  np.testing.assert_array_equal(R.ranks_from_scores([-1.0, -3.0, -0.5, -3.0], 4), [1, 2, 0, 3])


# -------------------------------------------------------------------------- diversity / novelty / business


def test_diversity_uses_attributes():
  # A = {brand:Acme, Office, Pens}, B = {brand:Acme, Office, Notebooks}: Jaccard 2/4.
  assert _call("diversity", _sample(["A", "B"])) == pytest.approx(0.5)
  # E = {brand:Zeta, Lighting} shares nothing with A or B: mean similarity (0.5 + 0 + 0) / 3.
  assert _call("diversity", _sample(["A", "B", "E"])) == pytest.approx(1 - 0.5 / 3)
  # Ungrounded titles and repeats are not items: the valid list is [A, B].
  assert _call("diversity", _sample(["A", "Bogus", "A", "B"])) == pytest.approx(0.5)


def test_diversity_falls_back_to_title_tokens():
  # F has no attributes, so titles: {acme, spiral, notebook} vs {acme, plain, notebook} -> 2/4.
  assert _call("diversity", _sample(["B", "F"])) == pytest.approx(0.5)
  assert _call("diversity", _sample(["A", "B"]), _ctx(diversity_attributes=())) == pytest.approx(1 - 1 / 5)


def test_diversity_needs_two_items():
  assert _call("diversity", _sample(["A"])) == 0.0
  assert _call("diversity", _sample(["A", "A"])) == 0.0


def test_novelty_is_normalised_self_information():
  ctx = _ctx()  # counts A=3, B=1: total 4, catalog 6 -> n = 10
  assert ctx.novelty("A") == pytest.approx(math.log(10 / 4) / math.log(10))
  assert ctx.novelty("B") == pytest.approx(math.log(10 / 2) / math.log(10))
  assert ctx.novelty("C") == pytest.approx(1.0)
  expected = (math.log(2.5) / math.log(10) + 1.0) / 2
  assert _call("novelty", _sample(["A", "C", "Bogus"]), ctx) == pytest.approx(expected)
  assert _call("novelty", _sample(["Bogus"]), ctx) == 0.0


def test_business_rule_attribute():
  ctx = _ctx(business_rule=R.BusinessRule(attribute="brand", value="Orbit", boost=2.0))
  assert _call("business", _sample(["C", "A", "D"]), ctx) == pytest.approx(2.0 * 2 / 3)
  assert _call("business", _sample(["C", "A", "D"])) == 0.0  # no rule configured
  lighting = _ctx(business_rule=R.BusinessRule(attribute="categories", value="Lighting"))
  assert _call("business", _sample(["E", "A"]), lighting) == pytest.approx(0.5)  # nested list value


def test_business_rule_from_file(tmp_path):
  path = tmp_path / "promoted.txt"
  path.write_text("A\n\n# seasonal\n  E \n", encoding="utf-8")
  rule = R.BusinessRule.from_file(path, catalog=CATALOG)
  assert rule.item_ids == {"A", "E"}
  assert _call("business", _sample(["A", "B"]), _ctx(business_rule=rule)) == pytest.approx(0.5)
  # Attribute OR id list.
  both = R.BusinessRule.from_file(path, attribute="brand", value="Orbit", boost=3.0)
  assert _call("business", _sample(["A", "C", "B"]), _ctx(business_rule=both)) == pytest.approx(3.0 * 2 / 3)


def test_business_rule_errors(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text("A\nZZZ\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"ids\.txt:2: item id 'ZZZ' is not in the catalog"):
    R.load_item_ids(path, CATALOG)
  assert R.load_item_ids(path) == {"A", "ZZZ"}  # without a catalog nothing is checked
  with pytest.raises(DataError, match="missing.txt: file not found"):
    R.load_item_ids(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="needs an attribute"):
    R.BusinessRule()
  with pytest.raises(ValueError, match="go together"):
    R.BusinessRule(attribute="brand")


# -------------------------------------------------------------------------- penalties and malformed answers


def test_penalties_count_slots():
  s = _sample(["A", "Bogus", "A", "B", "C"])  # history is (B,)
  assert _call("invalid", s) == pytest.approx(-1 / 5)
  assert _call("repeat", s) == pytest.approx(-1 / 5)
  assert _call("history", s) == pytest.approx(-1 / 5)
  k3 = _ctx(k=3)  # slots A, Bogus, A
  assert _call("invalid", s, k3) == pytest.approx(-1 / 3)
  assert _call("repeat", s, k3) == pytest.approx(-1 / 3)
  assert _call("history", s, k3) == 0.0
  assert [_call(n, _sample(["C", "D"])) for n in ("invalid", "repeat", "history")] == [0.0, 0.0, 0.0]


def test_titles_grounding_to_the_same_id_are_repeats():
  s = dataclasses.replace(_sample(["D", "D"]), titles=("Orbit Staples", "orbit staples"))
  assert _call("repeat", s) == pytest.approx(-0.5)


@pytest.mark.parametrize("reason", ["unclosed_think", "no_answer", "unclosed_answer", "empty_answer"])
def test_malformed_completion_scores(reason):
  s = _sample([], reason=reason)
  assert s.reason == reason and not s.scorable
  ctx = _ctx(business_rule=R.BusinessRule(item_ids={"C"}))
  got = {name: fn(s, ctx) for name, fn in R.REWARDS.items()}
  assert got == {
    "format": 0.0,
    "hit": 0.0,
    "ndcg": 0.0,
    "recall": 0.0,
    "rank_aware": 0.0,  # no group with a hit
    "rule": 0.0,
    "ndcg_rule": 0.0,  # no group with a hit
    "sid_prefix": 0.0,
    "diversity": 0.0,
    "novelty": 0.0,
    "business": 0.0,
    "invalid": -1.0,
    "repeat": -1.0,
    "history": -1.0,
  }


def test_malformed_with_parsed_titles_still_scores_zero():
  # Even if a parser kept titles, a bad reason zeroes content rewards.
  s = _sample(["C", "A"], reason="unclosed_answer")
  assert [_call(n, s) for n in ("hit", "ndcg", "recall", "rule", "diversity", "novelty")] == [0.0] * 6


def test_unknown_item_reason():
  s = _sample(["Bogus", "Bogus2"])
  assert s.reason == "unknown_item" and s.well_formed and not s.scorable
  assert _call("format", s) == 1.0
  assert _call("invalid", s) == -1.0
  assert _call("repeat", s) == 0.0  # ungrounded titles are invalid, not repeats
  assert _call("hit", s) == 0.0


def test_ok_reason_with_no_titles_does_not_crash():
  s = _sample([], reason="ok")
  assert s.reason == "unknown_item"
  assert {name: fn(s, _ctx()) for name, fn in R.REWARDS.items() if name in ("invalid", "repeat", "history")} == {
    "invalid": -1.0,
    "repeat": -1.0,
    "history": -1.0,
  }


def test_malformed_never_beats_a_wrong_answer_with_all_rewards_on():
  group = [["Bogus"], [], ["D", "D", "B"], ["C"]]
  reasons = ["ok", "no_answer", "ok", "ok"]
  samples = [_sample(g, reason=r, rank=i, group=group) for i, (g, r) in enumerate(zip(group, reasons))]
  weights = {name: 1.0 for name in R.REWARDS}
  total, _, counts = R.composite_rewards(samples, weights, _ctx(business_rule=R.BusinessRule(item_ids={"D"})))
  assert counts == {"ok": 2, "unknown_item": 1, "no_answer": 1}
  assert total[1] < total[0] < total[3]
  assert total[1] < total[2] < total[3]


# -------------------------------------------------------------------------- composition and registry


def title_count_reward(sample: R.Sample, ctx: R.RewardContext) -> float:
  """A user reward, resolved by import path in the tests below."""
  return float(len(sample.titles))


def nan_reward(sample: R.Sample, ctx: R.RewardContext) -> float:
  return float("nan")


def test_composite_rewards_hand_computed():
  samples = [_sample(["A", "C"]), _sample([], reason="unclosed_think"), _sample(["Bogus"])]
  weights = {"format": 0.5, "ndcg": 2.0, "invalid": 1.0, "novelty": 0.0}
  total, comps, counts = R.composite_rewards(samples, weights, _ctx())
  assert set(comps) == set(weights)
  np.testing.assert_allclose(comps["ndcg"], [1 / LOG2_3, 0.0, 0.0])
  np.testing.assert_allclose(comps["invalid"], [0.0, -1.0, -1.0])
  assert comps["novelty"][0] > 0  # weight 0 is still computed for logging
  np.testing.assert_allclose(total, [0.5 + 2 / LOG2_3, -1.0, 0.5 - 1.0])
  assert counts == collections.Counter({"ok": 1, "unclosed_think": 1, "unknown_item": 1})
  assert total.dtype == np.float64 and total.shape == (3,)


def test_custom_reward_by_import_path():
  samples = [_sample(["A", "C"]), _sample(["C"])]
  total, comps, _ = R.composite_rewards(
    samples, {"hit": 1.0, "n_titles": 0.25}, _ctx(), import_paths={"n_titles": f"{__name__}:title_count_reward"}
  )
  np.testing.assert_allclose(comps["n_titles"], [2.0, 1.0])
  np.testing.assert_allclose(total, [1.5, 1.25])
  assert R.resolve_reward("x", f"{__name__}:title_count_reward") is title_count_reward
  assert "x" not in R.REWARDS  # resolving does not register


def test_resolve_reward_errors():
  with pytest.raises(ConfigError, match="unknown reward rewards.nope"):
    R.resolve_reward("nope")
  with pytest.raises(ValueError, match="would shadow the built-in reward 'hit'"):
    R.resolve_reward("hit", f"{__name__}:title_count_reward")
  with pytest.raises(ValueError, match='expected "package.module:function"'):
    R.resolve_reward("x", "tests.rec.test_rewards.title_count_reward")
  with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
    R.resolve_reward("x", "no_such_module_xyz:fn")
  with pytest.raises(ValueError, match="has no attribute 'missing'"):
    R.resolve_reward("x", f"{__name__}:missing")
  with pytest.raises(ValueError, match="is not callable"):
    R.resolve_reward("x", f"{__name__}:LOG2_3")


def test_composite_rejects_bad_config():
  with pytest.raises(ValueError, match=r"reward_fns \['extra'\] have no weight"):
    R.composite_rewards([_sample(["C"])], {"hit": 1.0}, _ctx(), {"extra": f"{__name__}:title_count_reward"})
  with pytest.raises(ValueError, match="reward 'bad' returned nan for sample 0"):
    R.composite_rewards([_sample(["C"])], {"bad": 1.0}, _ctx(), {"bad": f"{__name__}:nan_reward"})


def test_register_adds_and_refuses_duplicates():
  try:
    R.register("test_only_reward")(title_count_reward)
    assert R.resolve_reward("test_only_reward") is title_count_reward
    R.register("test_only_reward")(title_count_reward)  # re-registering the same function is fine
    with pytest.raises(ValueError, match="already registered"):
      R.register("test_only_reward")(nan_reward)
  finally:
    R.REWARDS.pop("test_only_reward", None)


# -------------------------------------------------------------------------- building samples


@dataclasses.dataclass(frozen=True)
class Parsed:  # stands in for data.prompts.ParsedCompletion (same fields)
  titles: tuple[str, ...]
  reason: str


def test_build_samples_groups_and_grounds():
  grounder = Grounder(CATALOG)
  ex2 = Example(user_id="v", history=(), targets=("A",))
  parsed = [
    Parsed(("Orbit Stapler", "Nope"), "ok"),
    Parsed((), "no_answer"),
    Parsed(("acme gel pen",), "ok"),
    Parsed(("Orbit Staples",), "ok"),
  ]
  samples = R.build_samples([EXAMPLE, ex2], ["c0", "c1", "c2", "c3"], parsed, grounder, group_size=2,
                            group_ranks=[1, 0, 0, 1])
  assert [s.example for s in samples] == [EXAMPLE, EXAMPLE, ex2, ex2]
  assert [s.completion for s in samples] == ["c0", "c1", "c2", "c3"]
  assert samples[0].item_ids == ("C", None) and samples[0].matches == ("exact", None)
  assert samples[2].item_ids == ("A",) and samples[2].matches == ("fuzzy",)
  assert [s.group_rank for s in samples] == [1, 0, 0, 1]
  assert samples[1].group_items == (("C", None), ()) and samples[3].group_items == (("A",), ("D",))
  assert [s.reason for s in samples] == ["ok", "no_answer", "ok", "ok"]
  # The malformed member of a group with a hit is penalised at its rank (0 of 2).
  assert _call("rank_aware", samples[1]) == pytest.approx(R.rank_penalties(2)[0])


def test_build_samples_validates_layout():
  grounder = Grounder(CATALOG)
  parsed = [Parsed(("Orbit Stapler",), "ok")] * 2
  with pytest.raises(ValueError, match="expected 1 examples x group_size 2 = 2"):
    R.build_samples([EXAMPLE], ["c"], parsed[:1], grounder, group_size=2)
  with pytest.raises(ValueError, match="not a permutation"):
    R.build_samples([EXAMPLE], ["c", "d"], parsed, grounder, group_size=2, group_ranks=[0, 0])


def test_context_from_dataset_counts_train_only():
  train = [Example("u", ("A", "B"), ("C",)), Example("v", ("A",), ("B",))]
  valid = [Example("u", ("A", "B", "C"), ("D",))]
  ds = RecDataset(catalog=CATALOG, train=train, valid=valid, test=[])
  ctx = R.RewardContext.from_dataset(ds, k=5)
  assert ctx.popularity == {"A": 2, "B": 2, "C": 1}
  assert ctx.k == 5 and ctx.catalog is CATALOG
  assert ctx.novelty("D") == 1.0  # the valid target is not counted
  with pytest.raises(ValueError, match="k must be >= 1"):
    R.RewardContext(catalog=CATALOG, popularity={}, k=0)


def test_end_to_end_with_parse_completion():
  from recllm_jax.data.prompts import PromptConfig, parse_completion

  cfg = PromptConfig(target_format="cot")
  completions = [
    "The user buys staplers.\n</think>\n\n<answer>\nOrbit Stapler\nAcme Gel Pen\n</answer>",
    "The user buys staplers, so",  # cut off inside the think block
    "Hmm.\n</think>\n\n<answer>\nZeta Stapler Deluxe\n</answer>",
    "Pens.\n</think>\n\n<answer>\nAcme Gel Pen\nOrbit Stapler\n</answer>",
  ]
  parsed = [parse_completion(c, cfg, think_open=True) for c in completions]
  samples = R.build_samples([EXAMPLE], completions, parsed, Grounder(CATALOG), group_size=4)
  total, comps, counts = R.composite_rewards(samples, {"format": 0.1, "ndcg": 1.0, "rank_aware": 1.0}, _ctx(k=5))
  p = R.rank_penalties(4)
  np.testing.assert_allclose(comps["format"], [1.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(comps["ndcg"], [1.0, 0.0, 0.0, 1 / LOG2_3])
  np.testing.assert_allclose(comps["rank_aware"], [0.0, p[1], p[2], 0.0])
  np.testing.assert_allclose(total, [1.1, p[1], 0.1 + p[2], 0.1 + 1 / LOG2_3])
  assert counts == {"ok": 2, "unclosed_think": 1, "unknown_item": 1}
