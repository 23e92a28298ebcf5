"""GRPO policy loss over completion tokens, in the (sum, weight) form of `optim.LossFn`.

Per completion token t of row i (A_i the row's advantage, r = exp(logp - old_logp)):

    surrogate = min(r * A_i, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A_i)
    kl        = exp(ref - logp) - (ref - logp) - 1         (`kl_estimator` "k3", the default)
    l_it      = -surrogate + beta * kl - entropy_coef * entropy - sft_coef * s_i * logp_it

KL estimators (`kl_estimator`, Schulman 2020 "Approximating KL divergence"; d = ref - logp, an
estimate of KL(pi || ref) from tokens sampled from pi): "k1" = -d (unbiased, high variance, can be
negative; its gradient is that of logp alone), "k2" = d^2 / 2 (biased, >= 0, low variance; its
gradient pulls logp toward ref in proportion to the gap), "k3" = exp(d) - d - 1 (unbiased,
>= 0; DeepSeekMath and TRL). The kl term is skipped when beta == 0 or `ref_logp` is None, the entropy term when
`entropy` is None or entropy_coef == 0, the SFT term (s_i = 1 on rows that answer the target,
else 0: a negative log-likelihood on the hits, RAFT-style self-imitation) when `sft_rows` is
None or sft_coef == 0. With `old_logp=None` the old policy is the current one
under `stop_gradient` (one update per rollout: r == 1, gradient A * dlogp).

Aggregation (`loss_type`, TRL GRPOTrainer definitions; m the completion mask, n_i = sum_t m_it,
N rows, L = max_completion_length). Each returns (loss_sum, weight); `optim.make_train_step`
sums both over gradient-accumulation micro-batches and divides, which gives:

| loss_type | TRL formula                                 | loss_sum                      | weight |
|-----------|---------------------------------------------|-------------------------------|--------|
| "grpo"    | mean_i (sum_t l_it m_it / max(n_i, 1))      | sum_i sum_t l m / max(n_i, 1) | N      |
| "bnpo"    | sum_it l m / max(sum_it m, 1) (local batch) | that local mean               | 1      |
| "dr_grpo" | sum_it l m / (N * L)                        | sum_it l m                    | N * L  |
| "dapo"    | sum_it l m / (tokens of the global batch)   | sum_it l m                    | sum m  |

"grpo", "dr_grpo" and "dapo" are therefore exactly the one-big-batch loss under any
accumulation split. "bnpo" normalises by the tokens of each micro-batch and averages the
micro-batch losses (TRL's bnpo with gradient accumulation); use "dapo" for the global token
mean. "grpo" and "dr_grpo" count rows with no tokens (masked truncations) in N, as TRL does.

Metrics come back as aux sums that, divided by the same total weight, give per-token means:
each is `weight * (masked token sum / max(tokens, 1))` of the micro-batch. That is exact for a
single micro-batch and for "dapo"; otherwise it is the weight-weighted mean of the micro-batch
token means (TRL logs the mean of per-step means):

* `pg_loss`: -surrogate aggregated like the loss (so pg_loss = loss when beta == entropy_coef == 0)
* `kl`: mean KL estimate (the chosen estimator) vs the reference (whenever `ref_logp` is given, even with beta == 0)
* `clip_frac_low` / `clip_frac_high` / `clip_frac`: fraction of tokens where the min picks the
  clipped branch and the gradient is cut: r < 1 - epsilon_low with A < 0 / r > 1 + epsilon_high
  with A > 0 / either (TRL's is_low_clipped, is_high_clipped, is_region_clipped). Tokens
  outside the interval on the other side keep the unclipped branch and are not counted.
* `ratio`: mean r; `ratio_dev`: mean |r - 1|; `entropy`: mean entropy (when `entropy` is given).
* `sft_loss`: the SFT term's own value, sft_coef * -logp on the `sft_rows`, aggregated like the
  loss (when `sft_rows` is given).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from recllm_jax.registry import Registry

# (per-token loss [N, T] (already 0 off the mask), mask [N, T] float32, L) -> (loss_sum, weight)
AggregationFn = Callable[[jax.Array, jax.Array, "int | None"], tuple[jax.Array, jax.Array]]
LOSS_AGGREGATIONS: Registry[AggregationFn] = Registry("loss_type", "grpo.loss_type")
register_loss_aggregation = LOSS_AGGREGATIONS.register
get_loss_aggregation = LOSS_AGGREGATIONS.lookup


@register_loss_aggregation("grpo")
def _sequence_mean(per_token: jax.Array, mask: jax.Array,
                   max_completion_length: int | None) -> tuple[jax.Array, jax.Array]:
  del max_completion_length
  per_row = jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [N]
  return jnp.sum(per_row), jnp.asarray(per_token.shape[0], jnp.float32)


@register_loss_aggregation("bnpo")
def _local_token_mean(per_token: jax.Array, mask: jax.Array,
                      max_completion_length: int | None) -> tuple[jax.Array, jax.Array]:
  del max_completion_length
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0), jnp.ones((), jnp.float32)


@register_loss_aggregation("dr_grpo")
def _constant_normalizer(per_token: jax.Array, mask: jax.Array,
                         max_completion_length: int | None) -> tuple[jax.Array, jax.Array]:
  del mask
  if max_completion_length is None or max_completion_length < 1:
    raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1 (its normaliser is "
                     f"N * max_completion_length), got {max_completion_length}")
  return jnp.sum(per_token), jnp.asarray(per_token.shape[0] * max_completion_length, jnp.float32)


@register_loss_aggregation("dapo")
def _global_token_mean(per_token: jax.Array, mask: jax.Array,
                       max_completion_length: int | None) -> tuple[jax.Array, jax.Array]:
  del max_completion_length
  return jnp.sum(per_token), jnp.sum(mask)


# (logp [N, T], ref_logp [N, T]) -> per-token KL(pi || ref) estimate [N, T]
KlFn = Callable[[jax.Array, jax.Array], jax.Array]
KL_ESTIMATORS: Registry[KlFn] = Registry("KL estimator", "grpo.kl_estimator")
get_kl_estimator = KL_ESTIMATORS.lookup


@KL_ESTIMATORS.register("k1")
def k1_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token k1 estimate of KL(pi || ref) from samples of pi: logp - ref."""
  return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token k2 estimate of KL(pi || ref) from samples of pi: (logp - ref)^2 / 2."""
  return 0.5 * jnp.square(logp - ref_logp)


@KL_ESTIMATORS.register("k3")
def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1, d = ref - logp."""
  delta = ref_logp - logp
  return jnp.exp(delta) - delta - 1.0


def _check_shapes(logp: jax.Array, mask: jax.Array, advantages: jax.Array,
                  **others: jax.Array | None) -> None:
  if logp.ndim != 2:
    raise ValueError(f"logp must be [N, T], got shape {logp.shape}")
  if mask.shape != logp.shape:
    raise ValueError(f"mask has shape {mask.shape}, logp {logp.shape}; they must match")
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"advantages must be [N]={logp.shape[:1]}, got {advantages.shape}")
  for name, x in others.items():
    if x is not None and x.shape != logp.shape:
      raise ValueError(f"{name} has shape {x.shape}, logp {logp.shape}; they must match")


def policy_loss_terms(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None,
                      advantages: jax.Array, mask: jax.Array, *, loss_type: str,
                      epsilon_low: float, epsilon_high: float, beta: float,
                      max_completion_length: int | None = None,
                      entropy: jax.Array | None = None, entropy_coef: float = 0.0,
                      truncated: jax.Array | None = None, sft_rows: jax.Array | None = None,
                      sft_coef: float = 0.0, kl_estimator: str = "k3"
                      ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(loss_sum, weight, aux_sums) of the GRPO objective (module docstring has the formulas).

  logp [N, T] (differentiable), old_logp / ref_logp [N, T] or None, advantages [N], mask [N, T]
  (1 on completion tokens), entropy [N, T] or None. `truncated` [N] bool or None: rows flagged
  are dropped from loss and metrics entirely (TRL mask_truncated_completions). `sft_rows` [N]
  or None: 1 on the rows the SFT term trains. `beta`, `entropy_coef`, `sft_coef` and the
  epsilons are Python floats (they pick the terms at trace time); `kl_estimator` names a
  `KL_ESTIMATORS` entry.
  Values at masked positions never reach the loss or its gradient, even if they are inf/nan.
  """
  aggregate = get_loss_aggregation(loss_type)
  kl_fn = get_kl_estimator(kl_estimator)
  _check_shapes(logp, mask, advantages, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy)
  live = mask.astype(bool)  # [N, T]
  if truncated is not None:
    if truncated.shape != logp.shape[:1]:
      raise ValueError(f"truncated must be [N]={logp.shape[:1]}, got {truncated.shape}")
    live = live & ~truncated.astype(bool)[:, None]
  if sft_rows is not None and sft_rows.shape != logp.shape[:1]:
    raise ValueError(f"sft_rows must be [N]={logp.shape[:1]}, got {sft_rows.shape}")
  m = live.astype(jnp.float32)  # [N, T]

  # Padding may hold -inf/nan log-probs; zero them before any arithmetic so that neither the
  # value nor the gradient (0 * inf) sees them.
  def clean(x: jax.Array) -> jax.Array:
    return jnp.where(live, x.astype(jnp.float32), 0.0)

  logp = clean(logp)
  old_logp = jax.lax.stop_gradient(logp) if old_logp is None else clean(old_logp)
  adv = advantages.astype(jnp.float32)[:, None]  # [N, 1]

  ratio = jnp.exp(logp - old_logp)  # [N, T]
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv) * m  # [N, T]
  per_token = pg
  kl = None
  if ref_logp is not None:
    kl = kl_fn(logp, clean(ref_logp)) * m
    if beta != 0.0:
      per_token = per_token + beta * kl
  if entropy is not None:
    entropy = clean(entropy)
    if entropy_coef != 0.0:
      per_token = per_token - entropy_coef * entropy
  sft = None
  if sft_rows is not None:
    sft = -sft_coef * logp * sft_rows.astype(jnp.float32)[:, None]  # [N, T], 0 off the mask
    if sft_coef != 0.0:
      per_token = per_token + sft

  loss_sum, weight = aggregate(per_token, m, max_completion_length)
  tokens = jnp.maximum(jnp.sum(m), 1.0)

  def token_mean(x: jax.Array) -> jax.Array:  # aux sum whose value / weight is a token mean
    return jax.lax.stop_gradient(weight * jnp.sum(x * m) / tokens)

  low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # [N, T]
  high = (ratio > 1.0 + epsilon_high) & (adv > 0)
  aux = {
      "pg_loss": jax.lax.stop_gradient(aggregate(pg, m, max_completion_length)[0]),
      "clip_frac_low": token_mean(low.astype(jnp.float32)),
      "clip_frac_high": token_mean(high.astype(jnp.float32)),
      "clip_frac": token_mean((low | high).astype(jnp.float32)),
      "ratio": token_mean(ratio),
      # 0 exactly when every ratio is 1 (e.g. the first update after a rollout): a mean ratio of
      # 1 alone could hide deviations that cancel.
      "ratio_dev": token_mean(jnp.abs(ratio - 1.0)),
  }
  if kl is not None:
    aux["kl"] = token_mean(kl)
  if entropy is not None:
    aux["entropy"] = token_mean(entropy)
  if sft is not None:
    aux["sft_loss"] = jax.lax.stop_gradient(aggregate(sft, m, max_completion_length)[0])
  return loss_sum, weight, aux


def policy_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None,
                advantages: jax.Array, mask: jax.Array, **kwargs) -> jax.Array:
  """The scalar loss: loss_sum / weight of `policy_loss_terms` (same arguments).

  Divides by max(weight, 1) like `optim.make_train_step`, so an all-masked batch gives 0.
  """
  loss_sum, weight, _ = policy_loss_terms(logp, old_logp, ref_logp, advantages, mask, **kwargs)
  return loss_sum / jnp.maximum(weight, 1.0)


__all__ = ["KL_ESTIMATORS", "LOSS_AGGREGATIONS", "AggregationFn", "KlFn", "get_kl_estimator",
           "get_loss_aggregation", "k1_kl", "k2_kl", "k3_kl", "policy_loss",
           "policy_loss_terms", "register_loss_aggregation"]
