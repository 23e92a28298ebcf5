"""GRPO policy loss: every aggregation against a loop-based NumPy reference, clipping, KL,
entropy, masking and the (sum, weight) accumulation contract of `optim.LossFn`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recllm_jax.train.policy_loss import (LOSS_AGGREGATIONS, k3_kl, policy_loss,
                                          policy_loss_terms)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
EPS_LOW, EPS_HIGH, L = 0.2, 0.28, 6


def reference(logp, old, ref, adv, mask, *, loss_type, beta, entropy=None, entropy_coef=0.0):
  """Float64 loops over rows and tokens, written from the TRL formulas (not the module)."""
  n, t = logp.shape
  row_sums, row_counts, total, count = [], [], 0.0, 0
  kl_sum, ratio_sum, dev_sum, low, high = 0.0, 0.0, 0.0, 0, 0
  for i in range(n):
    s, c = 0.0, 0
    for j in range(t):
      if not mask[i, j]:
        continue
      r = math.exp(logp[i, j] - old[i, j])
      rc = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
      loss = -min(r * adv[i], rc * adv[i])
      d = ref[i, j] - logp[i, j]
      kl = math.exp(d) - d - 1
      loss += beta * kl
      if entropy is not None:
        loss -= entropy_coef * entropy[i, j]
      s, c = s + loss, c + 1
      kl_sum, ratio_sum = kl_sum + kl, ratio_sum + r
      dev_sum += abs(r - 1)
      low += r < 1 - EPS_LOW and adv[i] < 0
      high += r > 1 + EPS_HIGH and adv[i] > 0
    row_sums.append(s)
    row_counts.append(c)
    total, count = total + s, count + c
  loss = {"grpo": sum(s / max(c, 1) for s, c in zip(row_sums, row_counts)) / n,
          "bnpo": total / max(count, 1),
          "dr_grpo": total / (n * L),
          "dapo": total / count}[loss_type]
  metrics = {"kl": kl_sum / count, "ratio": ratio_sum / count, "ratio_dev": dev_sum / count,
             "clip_frac_low": low / count,
             "clip_frac_high": high / count, "clip_frac": (low + high) / count}
  return loss, metrics


def _inputs(scale: float, seed: int = 0):
  """N=4 rows of T=5 with ragged masks (row 3 has no tokens); logp - old_logp ~ scale."""
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3.0, (4, 5))
  old = logp + scale * rng.standard_normal((4, 5))
  ref = logp + 0.5 * rng.standard_normal((4, 5))
  adv = np.array([1.3, -0.7, 0.4, 2.0])
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
  return logp, old, ref, adv, mask


def _terms(logp, old, ref, adv, mask, **kw):
  kw = {"loss_type": "dapo", "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "beta": 0.0,
        "max_completion_length": L, **kw}
  cast = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return policy_loss_terms(cast(logp), cast(old), cast(ref), cast(adv), jnp.asarray(mask), **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("scale", [0.01, 0.8], ids=["no_clip", "clip"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_metrics_match_numpy_reference(loss_type, scale, beta):
  logp, old, ref, adv, mask = _inputs(scale)
  want, want_metrics = reference(logp, old, ref, adv, mask, loss_type=loss_type, beta=beta)
  loss_sum, weight, aux = _terms(logp, old, ref, adv, mask, loss_type=loss_type, beta=beta)
  assert float(loss_sum / weight) == pytest.approx(want, rel=1e-5, abs=1e-7)
  metrics = {k: float(v / weight) for k, v in aux.items()}
  for k, v in want_metrics.items():
    assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
  # Make sure both regimes are really exercised.
  assert (want_metrics["clip_frac"] > 0) == (scale > 0.1)
  # pg_loss is the loss without the KL term.
  pg, _ = reference(logp, old, ref, adv, mask, loss_type=loss_type, beta=0.0)
  assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-5, abs=1e-7)


def test_clipping_by_hand():
  # Row 0 (A=+1) ratios 1.5, 0.5, 1.0; row 1 (A=-1) ratios 0.5, 1.5, 1.1; eps = 0.2.
  # Clipped (the min picks the clipped branch): row 0 token 0 (high) and row 1 token 0 (low).
  # 0.5 with A>0 and 1.5 with A<0 lie outside the interval but keep the unclipped branch.
  ratios = np.array([[1.5, 0.5, 1.0], [0.5, 1.5, 1.1]])
  logp = jnp.zeros((2, 3))
  old = -jnp.log(jnp.asarray(ratios, jnp.float32))
  adv = jnp.array([1.0, -1.0])
  mask = jnp.ones((2, 3))
  kw = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, beta=0.0)
  loss_sum, weight, aux = policy_loss_terms(logp, old, None, adv, mask, **kw)
  # surrogates: row 0 (1.2, 0.5, 1.0), row 1 (-0.8, -1.5, -1.1) -> loss -(2.7 - 3.4) / 6.
  assert float(weight) == 6.0
  assert float(loss_sum) == pytest.approx(0.7, rel=1e-6)
  assert float(aux["clip_frac_low"] / weight) == pytest.approx(1 / 6)
  assert float(aux["clip_frac_high"] / weight) == pytest.approx(1 / 6)
  assert float(aux["clip_frac"] / weight) == pytest.approx(2 / 6)
  assert "kl" not in aux and "entropy" not in aux
  # d/dlogp of -r*A is -r*A; clipped tokens get no gradient.
  grad = jax.grad(lambda lp: policy_loss(lp, old, None, adv, mask, **kw))(logp)
  np.testing.assert_allclose(grad, np.array([[0.0, -0.5, -1.0], [0.0, 1.5, 1.1]]) / 6, rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_without_kl_give_exactly_zero_gradient(loss_type):
  logp, old, ref, _, mask = _inputs(0.8)
  grad = jax.grad(lambda lp: policy_loss(
      lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.zeros(4),
      jnp.asarray(mask), loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
      beta=0.0, max_completion_length=L))(jnp.asarray(logp, jnp.float32))
  assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("old_is_none", [False, True])
def test_on_policy_ratio_is_one_and_nothing_is_clipped(old_is_none):
  logp, _, ref, adv, mask = _inputs(0.0)
  old = None if old_is_none else logp
  loss_sum, weight, aux = _terms(logp, old, ref, adv, mask, loss_type="grpo", beta=0.1)
  assert float(aux["ratio"] / weight) == pytest.approx(1.0, abs=1e-7)
  assert float(aux["ratio_dev"]) == 0.0
  assert float(aux["clip_frac"]) == 0.0
  # On-policy, the gradient of the surrogate is -A * dlogp, masked, per the grpo aggregation.
  grad = jax.grad(lambda lp: _terms(lp, None, None, adv, mask, loss_type="grpo")[0] / 4)(
      jnp.asarray(logp, jnp.float32))
  counts = np.maximum(mask.sum(1, keepdims=True), 1)
  np.testing.assert_allclose(grad, -adv[:, None] * mask / counts / 4, rtol=1e-6)


def test_entropy_bonus_gradient_rewards_entropy():
  logp, old, ref, adv, mask = _inputs(0.3)
  entropy = np.random.default_rng(1).uniform(0.5, 2.0, logp.shape)

  def loss(ent):
    s, w, _ = _terms(logp, old, ref, adv, mask, beta=0.04, entropy=ent, entropy_coef=0.01)
    return s / w

  grad = np.asarray(jax.grad(loss)(jnp.asarray(entropy, jnp.float32)))
  # dapo: d loss / d entropy_it = -coef / tokens on live tokens, 0 elsewhere.
  np.testing.assert_allclose(grad, -0.01 * mask / mask.sum(), rtol=1e-6)
  want, _ = reference(logp, old, ref, adv, mask, loss_type="dapo", beta=0.04, entropy=entropy,
                      entropy_coef=0.01)
  assert float(loss(jnp.asarray(entropy, jnp.float32))) == pytest.approx(want, rel=1e-5)
  _, w, aux = _terms(logp, old, ref, adv, mask, beta=0.04, entropy=entropy, entropy_coef=0.01)
  assert float(aux["entropy"] / w) == pytest.approx((entropy * mask).sum() / mask.sum(), rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_sums_reproduce_the_big_batch(loss_type):
  logp, old, ref, adv, mask = _inputs(0.8)
  kw = dict(loss_type=loss_type, beta=0.04)
  full, _ = reference(logp, old, ref, adv, mask, **kw)
  halves = [_terms(*(x[rows] for x in (logp, old, ref, adv, mask)), **kw)
            for rows in (slice(0, 2), slice(2, 4))]
  accumulated = float(sum(h[0] for h in halves) / sum(h[1] for h in halves))
  if loss_type == "bnpo":  # local token mean per micro-batch, averaged (TRL semantics)
    full = np.mean([reference(*(x[rows] for x in (logp, old, ref, adv, mask)), **kw)[0]
                    for rows in (slice(0, 2), slice(2, 4))])
  assert accumulated == pytest.approx(full, rel=1e-5)


def test_masked_positions_cannot_poison_loss_or_gradient():
  logp, old, ref, adv, mask = _inputs(0.8)
  bad = lambda x, v: np.where(mask, x, v)
  clean_loss = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv)),
                           jnp.asarray(mask), loss_type="grpo", epsilon_low=EPS_LOW,
                           epsilon_high=EPS_HIGH, beta=0.04)

  def loss(lp):
    return policy_loss(lp, jnp.asarray(bad(old, np.nan), jnp.float32),
                       jnp.asarray(bad(ref, 1e4), jnp.float32), jnp.asarray(adv, jnp.float32),
                       jnp.asarray(mask), loss_type="grpo", epsilon_low=EPS_LOW,
                       epsilon_high=EPS_HIGH, beta=0.04)

  value, grad = jax.value_and_grad(loss)(jnp.asarray(bad(logp, -np.inf), jnp.float32))
  assert float(value) == pytest.approx(float(clean_loss), rel=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_truncated_rows_are_masked_entirely(loss_type):
  logp, old, ref, adv, mask = _inputs(0.8)
  truncated = np.array([False, True, False, False])
  got = _terms(logp, old, ref, adv, mask, loss_type=loss_type, beta=0.04,
               truncated=jnp.asarray(truncated))
  want = _terms(logp, old, ref, adv, mask * ~truncated[:, None], loss_type=loss_type, beta=0.04)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6)
  # grpo and dr_grpo keep the row in N, as TRL does.
  assert float(got[1]) == {"grpo": 4, "bnpo": 1, "dr_grpo": 4 * L, "dapo": 6}[loss_type]


def test_k3_kl_by_hand():
  kl = k3_kl(jnp.array([0.0, -1.0]), jnp.array([math.log(2.0), -1.0]))
  np.testing.assert_allclose(kl, [1 - math.log(2.0), 0.0], atol=1e-7)


def test_kl_estimators_by_hand_and_in_the_loss():
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.policy_loss import KL_ESTIMATORS, get_kl_estimator

  logp, ref = jnp.array([0.0, -1.0, -2.0]), jnp.array([math.log(2.0), -1.0, -1.5])
  want = {"k1": [-math.log(2.0), 0.0, -0.5],  # logp - ref
          "k2": [math.log(2.0) ** 2 / 2, 0.0, 0.125],  # (logp - ref)^2 / 2
          "k3": [1 - math.log(2.0), 0.0, math.exp(0.5) - 1.5]}  # e^d - d - 1, d = ref - logp
  assert sorted(KL_ESTIMATORS) == sorted(want)
  for name, values in want.items():
    np.testing.assert_allclose(get_kl_estimator(name)(logp, ref), values, atol=1e-6)
  # In the loss, with zero advantages the loss is beta * the chosen estimator's token mean
  # ("dapo": the global token mean), and the logged kl is that mean.
  lp, mask, zeros = logp[None], jnp.ones((1, 3)), jnp.zeros(1)
  for name, values in want.items():
    loss_sum, weight, aux = _terms(lp, None, ref[None], zeros, mask, loss_type="dapo", beta=0.5,
                                   kl_estimator=name)
    assert float(loss_sum / weight) == pytest.approx(0.5 * np.mean(values), abs=1e-6)
    assert float(aux["kl"] / weight) == pytest.approx(np.mean(values), abs=1e-6)
  with pytest.raises(ConfigError, match="grpo.kl_estimator"):
    get_kl_estimator("k4")


def test_jit_and_clear_errors():
  logp, old, ref, adv, mask = _inputs(0.3)
  jitted = jax.jit(functools.partial(_terms, loss_type="dr_grpo", beta=0.04))
  np.testing.assert_allclose(jitted(logp, old, ref, adv, mask)[0],
                             _terms(logp, old, ref, adv, mask, loss_type="dr_grpo", beta=0.04)[0],
                             rtol=1e-6)
  assert sorted(LOSS_AGGREGATIONS) == sorted(LOSS_TYPES)
  with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
    _terms(logp, old, ref, adv, mask, loss_type="ppo")
  with pytest.raises(ValueError, match="dr_grpo' needs max_completion_length"):
    _terms(logp, old, ref, adv, mask, loss_type="dr_grpo", max_completion_length=None)
  with pytest.raises(ValueError, match=r"advantages must be \[N\]"):
    _terms(logp, old, ref, adv[:3], mask)
  with pytest.raises(ValueError, match="ref_logp has shape"):
    _terms(logp, old, ref[:, :4], adv, mask)


def test_sft_term_is_the_nll_of_the_target_rows():
  """grpo aggregation, hand-computed: rows 0 and 2 answer the target; the SFT term adds
  coef * (mean -logp over each such row's tokens) / N to the loss, and its gradient is
  -coef / (row tokens * N) on exactly those rows' live tokens."""
  logp, old, ref, adv, mask = _inputs(0.3)
  sft_rows = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  kw = dict(loss_type="grpo", beta=0.04)
  base, _ = reference(logp, old, ref, adv, mask, **kw)
  counts = np.maximum(mask.sum(1), 1)
  nll = sum(-(logp[i] * mask[i]).sum() / counts[i] for i in (0, 2)) / 4
  s, w, aux = _terms(logp, old, ref, adv, mask, sft_rows=sft_rows, sft_coef=0.5, **kw)
  assert float(s / w) == pytest.approx(base + 0.5 * nll, rel=1e-5)
  assert float(aux["sft_loss"] / w) == pytest.approx(0.5 * nll, rel=1e-5)

  def sft_only(lp):
    with_sft = _terms(lp, old, ref, adv, mask, sft_rows=sft_rows, sft_coef=0.5, **kw)
    without = _terms(lp, old, ref, adv, mask, **kw)
    return (with_sft[0] - without[0]) / with_sft[1]

  grad = np.asarray(jax.grad(sft_only)(jnp.asarray(logp, jnp.float32)))
  np.testing.assert_allclose(grad, -0.5 * sft_rows[:, None] * mask / counts[:, None] / 4,
                             rtol=1e-5, atol=1e-7)
  # Given but weighted 0: reported, not trained.
  s0, _, aux0 = _terms(logp, old, ref, adv, mask, sft_rows=sft_rows, sft_coef=0.0, **kw)
  assert float(s0 / w) == pytest.approx(base, rel=1e-5) and float(aux0["sft_loss"]) == 0.0
  with pytest.raises(ValueError, match="sft_rows must be"):
    _terms(logp, old, ref, adv, mask, sft_rows=sft_rows[:3], sft_coef=0.5, **kw)
