"""GRPO advantage estimators: group-relative rewards, selected by name from the config.

A rollout samples G completions per prompt and lays them out as groups of G consecutive rows
(`rewards[p * G + g]`, the layout `generate(..., num_samples=G)` produces). Each completion's
advantage is its reward relative to its own group, so no value network is needed; the
estimators differ only in how that difference is scaled:

* "grpo"    (r - mean_group) / (std_group + eps)  (DeepSeekMath GRPO; TRL scale_rewards="group")
* "dr_grpo" r - mean_group                         (Dr. GRPO, Liu et al. 2025: the std
                                                     scaling biases updates towards groups that
                                                     are almost all right or all wrong; TRL
                                                     scale_rewards="none")
* "batch"   (r - mean_group) / (std_batch + eps)  (group baseline, one batch-wide scale; TRL
                                                     scale_rewards="batch")

Std is the *sample* std (ddof=1, Bessel-corrected), as TRL's `torch.Tensor.std()`, so numbers
agree with TRL runs; hence G >= 2. A group whose rewards are all equal carries no learning
signal: it is detected by exact equality (not a tolerance on a float std, which can come out
as ~1e-8 for equal rewards) and its advantages are exactly 0 in every estimator.
`frac_zero_std` is the fraction of such groups (TRL's frac_reward_zero_std, always measured
per group, also under "batch").

All functions are pure jnp and run on the host or under `jax.jit` (with `num_generations`
static). New estimators are added with `@register_advantage("name")`.

Dynamic sampling (DAPO, Yu et al. 2025; `grpo.dynamic_sampling`) drops the groups without
signal and refills the batch from further rollouts: `group_has_signal` says which groups carry
signal, `select_groups` picks exactly the batch's number of groups to train on (static shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from recllm_jax.registry import Registry

# TRL's GRPOTrainer constant; large enough that a near-zero std cannot blow advantages up.
DEFAULT_EPS = 1e-4

# (rewards [N], num_generations G, eps) -> advantages [N]
AdvantageFn = Callable[..., jax.Array]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", "grpo.advantage")
register_advantage = ADVANTAGES.register
get_advantage_fn = ADVANTAGES.lookup


class GroupStats(NamedTuple):
  """Per-row statistics of the row's group, broadcast back to [N]."""

  mean: jax.Array  # [N] float32
  std: jax.Array  # [N] float32, sample std (ddof=1)
  zero_std: jax.Array  # [N] bool: every reward in the group is equal


def _groups(rewards: jax.Array, num_generations: int) -> jax.Array:
  """[N] rewards -> [P, G] float32, with clear errors for a bad layout."""
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
  if num_generations < 2:
    raise ValueError(f"num_generations (G) must be >= 2 for a group baseline and a sample "
                     f"std, got {num_generations}")
  if rewards.shape[0] % num_generations:
    raise ValueError(f"rewards has {rewards.shape[0]} rows, not a multiple of "
                     f"num_generations={num_generations} (groups are G consecutive rows)")
  return rewards.astype(jnp.float32).reshape(-1, num_generations)  # [P, G]


def group_stats(rewards: jax.Array, num_generations: int) -> GroupStats:
  """Mean, sample std and the all-equal flag of each row's group of G consecutive rows."""
  grouped = _groups(rewards, num_generations)  # [P, G]
  mean = jnp.mean(grouped, axis=1)  # [P]
  std = jnp.std(grouped, axis=1, ddof=1)  # [P]
  zero = jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)  # [P]
  expand = lambda x: jnp.repeat(x, num_generations)  # [P] -> [N], row p*G+g gets group p
  return GroupStats(mean=expand(mean), std=expand(std), zero_std=expand(zero))


def _centered(rewards: jax.Array, stats: GroupStats) -> jax.Array:
  """r - mean_group, exactly 0 for all-equal groups."""
  return jnp.where(stats.zero_std, 0.0, jnp.asarray(rewards, jnp.float32) - stats.mean)


@register_advantage("grpo")
def grpo_advantages(rewards: jax.Array, num_generations: int, *,
                    eps: float = DEFAULT_EPS) -> jax.Array:
  """(r - mean_group) / (std_group + eps): [N] -> [N]."""
  stats = group_stats(rewards, num_generations)
  return _centered(rewards, stats) / (stats.std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: jax.Array, num_generations: int, *,
                       eps: float = DEFAULT_EPS) -> jax.Array:
  """r - mean_group (no std scaling; `eps` unused): [N] -> [N]."""
  del eps
  return _centered(rewards, group_stats(rewards, num_generations))


@register_advantage("batch")
def batch_advantages(rewards: jax.Array, num_generations: int, *,
                     eps: float = DEFAULT_EPS) -> jax.Array:
  """(r - mean_group) / (sample std of all N rewards + eps): [N] -> [N]."""
  stats = group_stats(rewards, num_generations)
  batch_std = jnp.std(jnp.asarray(rewards, jnp.float32), ddof=1)  # []
  return _centered(rewards, stats) / (batch_std + eps)


def group_has_signal(rewards: jax.Array, num_generations: int) -> jax.Array:
  """[N] rewards -> [P] bool: the group's rewards are not all equal (std > 0), i.e. its
  advantages are not all 0. The same exact-equality test as `GroupStats.zero_std`."""
  grouped = _groups(rewards, num_generations)  # [P, G]
  return jnp.max(grouped, axis=1) != jnp.min(grouped, axis=1)


def select_groups(has_signal: Sequence[bool], size: int) -> list[int]:
  """Which `size` of the collected groups (in draw order) to train on, for dynamic sampling.

  The first `size` groups with signal; if fewer were collected, the earliest groups without
  signal fill the rest (their advantages are 0: they add only the KL term, as they would
  without dynamic sampling), so the update always sees exactly `size` groups. Returned in
  draw order. Example: has_signal = [F, T, F, T | T, F], size 3 -> [1, 3, 4].
  """
  has_signal = [bool(x) for x in has_signal]
  if size < 1 or len(has_signal) < size:
    raise ValueError(f"cannot select {size} groups from {len(has_signal)} collected")
  chosen = [i for i, x in enumerate(has_signal) if x][:size]
  chosen += [i for i, x in enumerate(has_signal) if not x][:size - len(chosen)]
  return sorted(chosen)


def compute_advantages(rewards: jax.Array, num_generations: int, *, estimator: str = "grpo",
                       eps: float = DEFAULT_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Advantages [N] of the named estimator, plus scalar group statistics for logging.

  stats: `frac_zero_std` (fraction of groups whose rewards are all equal), `reward_mean`,
  `reward_std_group` (mean of the per-group sample stds).
  """
  advantages = get_advantage_fn(estimator)(rewards, num_generations, eps=eps)
  stats = group_stats(rewards, num_generations)
  # Groups have equal size, so the row mean of a per-group value is its group mean.
  return advantages, {
      "frac_zero_std": jnp.mean(stats.zero_std.astype(jnp.float32)),
      "reward_mean": jnp.mean(stats.mean),
      "reward_std_group": jnp.mean(stats.std),
  }


__all__ = ["ADVANTAGES", "DEFAULT_EPS", "AdvantageFn", "GroupStats", "batch_advantages",
           "compute_advantages", "dr_grpo_advantages", "get_advantage_fn", "group_has_signal",
           "group_stats", "grpo_advantages", "register_advantage", "select_groups"]
