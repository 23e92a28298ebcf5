"""GRPO advantage estimators on a hand-computed example, incl. an all-equal group."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recllm_jax.train import advantages as adv_lib

# Three groups of G=3: a spread group, an all-equal group (0.1 is not exact in float32, so a
# float mean can miss it by an ulp) and a skewed group.
REWARDS = np.array([1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 0.0, 0.0, 4.0], np.float32)
G = 3
EPS = 1e-4
# Group 0: mean 2, sample std 1 (the population std would be sqrt(2/3)).
# Group 2: mean 4/3, deviations (-4/3, -4/3, 8/3), sample var (16+16+64)/9/2 = 16/3.
STD2 = 4 / math.sqrt(3)
CENTERED = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -4 / 3, -4 / 3, 8 / 3]


def test_group_stats_use_the_sample_std_and_exact_equality():
  stats = adv_lib.group_stats(jnp.asarray(REWARDS), G)
  np.testing.assert_allclose(stats.mean, [2, 2, 2, 0.1, 0.1, 0.1, 4 / 3, 4 / 3, 4 / 3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats.std)[[0, 6]], [1.0, STD2], rtol=1e-6)
  np.testing.assert_array_equal(stats.zero_std, [False] * 3 + [True] * 3 + [False] * 3)


def test_grpo_scales_by_the_group_std():
  got = adv_lib.grpo_advantages(jnp.asarray(REWARDS), G, eps=EPS)
  want = [c / (s + EPS) for c, s in zip(CENTERED, [1.0] * 3 + [1.0] * 3 + [STD2] * 3)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.all(np.asarray(got)[3:6] == 0.0)  # exactly, not ~1e-8 / eps


def test_dr_grpo_only_centers():
  got = adv_lib.dr_grpo_advantages(jnp.asarray(REWARDS), G)
  np.testing.assert_allclose(got, CENTERED, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(got)[3:6] == 0.0)


def test_batch_scales_by_one_sample_std_of_all_rewards():
  # sum r^2 = 30.03, sum r = 10.3 -> sum of squared deviations 30.03 - 10.3^2 / 9, over N-1 = 8.
  batch_std = math.sqrt((30.03 - 10.3**2 / 9) / 8)
  assert batch_std == pytest.approx(np.std(REWARDS.astype(np.float64), ddof=1), rel=1e-6)
  got = adv_lib.batch_advantages(jnp.asarray(REWARDS), G, eps=EPS)
  np.testing.assert_allclose(got, np.array(CENTERED) / (batch_std + EPS), rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(got)[3:6] == 0.0)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "batch"])
def test_compute_advantages_selects_by_name_and_reports_zero_std_groups(estimator):
  fn = jax.jit(adv_lib.compute_advantages, static_argnums=1,
               static_argnames=("estimator", "eps"))
  got, stats = fn(jnp.asarray(REWARDS), G, estimator=estimator, eps=EPS)
  np.testing.assert_allclose(got, adv_lib.ADVANTAGES[estimator](REWARDS, G, eps=EPS), rtol=1e-6)
  assert float(stats["frac_zero_std"]) == pytest.approx(1 / 3)
  assert float(stats["reward_mean"]) == pytest.approx(REWARDS.mean(), rel=1e-6)
  assert float(stats["reward_std_group"]) == pytest.approx((1 + 0 + STD2) / 3, rel=1e-6)


def test_all_groups_equal_give_zero_advantages_everywhere():
  rewards = jnp.array([0.3, 0.3, 1.0, 1.0])
  for name in adv_lib.ADVANTAGES:
    assert np.all(np.asarray(adv_lib.ADVANTAGES[name](rewards, 2)) == 0.0), name
  assert float(adv_lib.compute_advantages(rewards, 2)[1]["frac_zero_std"]) == 1.0


def test_bad_layouts_and_names_are_clear_errors():
  with pytest.raises(ValueError, match="multiple of num_generations=4"):
    adv_lib.grpo_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match=r"num_generations \(G\) must be >= 2"):
    adv_lib.grpo_advantages(jnp.zeros(6), 1)
  with pytest.raises(ValueError, match=r"1-D \[N\]"):
    adv_lib.grpo_advantages(jnp.zeros((2, 3)), 3)
  with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*'dr_grpo'"):
    adv_lib.compute_advantages(jnp.zeros(6), 3, estimator="ppo")
  with pytest.raises(ValueError, match="already registered"):
    adv_lib.register_advantage("grpo")(adv_lib.dr_grpo_advantages)


# --- dynamic sampling (DAPO) ---------------------------------------------------------------------


def test_group_has_signal_is_the_negation_of_zero_std():
  np.testing.assert_array_equal(adv_lib.group_has_signal(jnp.asarray(REWARDS), G), [True, False, True])


@pytest.mark.parametrize("signal, size, expected", [
    # Round 0 has 2 of 4 groups with signal; round 1 adds two more: the first 4 with signal.
    ([False, True, False, True, True, False, True, True], 4, [1, 3, 4, 6]),
    # Enough in round 0 already.
    ([True, True, False, True], 2, [0, 1]),
    # Too few with signal after every round: the earliest zero-signal groups fill in.
    ([False, True, False, False, False, False], 3, [0, 1, 2]),
    ([False, False, False, False], 2, [0, 1]),
])
def test_select_groups_by_hand(signal, size, expected):
  assert adv_lib.select_groups(signal, size) == expected


def test_select_groups_needs_enough_groups():
  with pytest.raises(ValueError):
    adv_lib.select_groups([True], 2)
