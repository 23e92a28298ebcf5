"""Optimizer, train state and the task-agnostic jitted update step.

Every trainer (SFT now, GRPO later) describes its objective as a `LossFn` returning a
*sum* and a *weight* (e.g. summed token cross-entropy and the number of target tokens). The
update step divides the summed gradients by the summed weights of all micro-batches, so
gradient accumulation computes exactly the loss and gradient of one big batch, whatever the
split. The step runs on `nnx.split` state with plain `jax.jit` and donates the train state,
so params and optimizer moments are updated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recllm_jax.models.config import dtype_from_name
from recllm_jax.sharding import shard

# (model, batch, rng) -> (loss_sum, weight, aux sums). Aux values are summed over micro-batches
# and divided by the total weight too, so they report per-weight means.
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
StepFn = Callable[["TrainState", Mapping[str, jax.Array]], tuple["TrainState", dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training and must be checkpointed (besides data state)."""

  step: jax.Array  # int32 []
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key data, so Orbax saves it as a plain array


def make_schedule(lr: float, num_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `num_steps`."""
  warmup_steps = max(0, min(warmup_steps, num_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: biases and norm scales are not regularised."""

  def decays(path, _) -> bool:
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return not names & {"bias", "scale"}

  return jax.tree.map_with_path(decays, params)


class MasterParamsState(NamedTuple):
  """`with_master_params` state: the high-precision copy of the params and the inner state.

  `master` has the params' tree paths (under `.master`), so its shardings follow the params
  like the optimizer moments do (`state_shardings_following_params`).
  """

  master: Any
  inner: optax.OptState


def with_master_params(inner: optax.GradientTransformation,
                       master_dtype: Any = jnp.float32) -> optax.GradientTransformation:
  """`inner` run on a `master_dtype` copy of the params, kept in the optimizer state.

  With bf16 params, an update smaller than half a bf16 step (2^-8 relative, e.g. lr 1e-5 x
  Adam's ~unit step on weights near 1) rounds back to the old value and is lost for ever. Here
  the gradients are cast up, `inner` (moments included) runs in `master_dtype` on the master
  copy, the master accumulates every update, and the returned update moves the params to
  the master rounded to their own dtype: `apply_updates(params, u)` = cast(master_new).

  The update `cast(master_new) - params` is returned in `master_dtype`: `apply_updates` adds it
  in that precision before casting down, which lands exactly on the rounded master (the same
  difference taken in bf16 could itself round). Params already in `master_dtype` are
  duplicated for nothing; the config check rejects that case.
  """
  dtype = jnp.dtype(master_dtype)

  def up(tree):
    return jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    master = up(params)
    return MasterParamsState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_params needs the params in update(grads, state, params)")
    updates, inner_state = inner.update(up(grads), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    # Both terms are params-dtype values, so their difference is exact in `master_dtype` (for
    # bf16 in fp32, unless they lie > 2^16 apart) and `params + u` lands on cast(master).
    to_master = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dtype) - p.astype(dtype),
                             master, params)
    return to_master, MasterParamsState(master=master, inner=inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float, max_grad_norm: float,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   master_dtype: str = "") -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW (decoupled weight decay on matrices).

  `master_dtype` (e.g. "float32", config `train.master_dtype`): run it on a master copy of
  the params in that dtype (`with_master_params`); "" updates the params in their own dtype.
  """
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  optimizer = optax.chain(*parts)
  if master_dtype:
    return with_master_params(optimizer, dtype_from_name(master_dtype))
  return optimizer


def state_shardings_following_params(abstract_state: TrainState,
                                     params: nnx.State) -> TrainState | None:
  """Shardings for the train state: optimizer moments follow their parameter, scalars replicate.

  `optimizer.init` builds moments with `zeros_like`, which XLA would otherwise leave
  replicated: every device would hold the full Adam state, defeating FSDP. Moments are matched
  to parameters by tree path (an optax moment's path ends with its parameter's path).
  """
  leaves = jax.tree.leaves(params)
  if not leaves or not isinstance(leaves[0].sharding, jax.sharding.NamedSharding):
    return None  # single device: nothing to lay out
  mesh = leaves[0].sharding.mesh
  by_path = {jax.tree_util.keystr(p): x.sharding
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def sharding_for(path, leaf):
    key = jax.tree_util.keystr(path)
    for start in [i for i, c in enumerate(key) if c == "["]:
      match = by_path.get(key[start:])
      if match is not None and len(match.spec) <= leaf.ndim:
        return match
    return replicated

  return jax.tree.map_with_path(sharding_for, abstract_state)


def trainable_filter(model_cfg: Any) -> Any:
  """The nnx filter of the params a run trains: `nnx.LoRAParam` for a LoRA model
  (`model.lora.rank > 0`: the base is frozen), else every `nnx.Param`."""
  return nnx.LoRAParam if getattr(model_cfg, "lora_rank", 0) else nnx.Param


def split_trainable(params: nnx.State, wrt: Any = nnx.Param) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of `params` by the nnx filter `wrt` (frozen empty for Param)."""
  return nnx.split_state(params, wrt, ...)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                     seed: int, wrt: Any = nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the (sharded) model and builds the train state with FSDP-sharded moments.

  `params` holds every parameter; the optimizer state covers only those `wrt` selects (a LoRA
  run: `nnx.LoRAParam`, so the frozen base has no Adam moments).
  """
  graphdef, params = nnx.split(model, nnx.Param)

  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                      opt_state=optimizer.init(split_trainable(p, wrt)[0]),
                      rng=jax.random.key_data(jax.random.key(seed)))

  shardings = state_shardings_following_params(jax.eval_shape(init, params), params)
  return graphdef, jax.jit(init, out_shardings=shardings)(params)


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] rows -> [n, B/n, ...] micro-batches, micro-batch i = rows i, i+n, i+2n, ...

  The batch arrives sharded in contiguous row blocks over the batch mesh axes (data x fsdp).
  Contiguous micro-batches (rows i*B/n ...) would each live on a 1/n slice of those devices
  (or be replicated by XLA). The strided split takes B/(n*devices) rows of every device's
  block for every micro-batch, so each one spans all batch devices with no data movement;
  the constraint keeps the B/n axis sharded that way. Gradient sums do not depend on which
  rows share a micro-batch.
  """

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {n} micro-batches")
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])  # [B/n, n, ...]: row r*n + i -> (r, i)
    x = jnp.swapaxes(x, 0, 1)  # [n, B/n, ...]
    return shard(x, (None, "batch") + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}


def _accumulated_grads(graphdef: nnx.GraphDef, loss_fn: LossFn, params: nnx.State,
                       batch: Mapping[str, jax.Array], rng: jax.Array, grad_accum_steps: int,
                       frozen: nnx.State | None = None):
  """Sums of loss, weight, aux and gradients (w.r.t. `params`; `frozen` params are merged into
  the model but not differentiated) over micro-batches (one `lax.scan`)."""
  frozen_states = () if frozen is None else (frozen,)

  def summed(p, micro, key):
    loss_sum, weight, aux = loss_fn(nnx.merge(graphdef, p, *frozen_states), micro, key)
    return loss_sum, (weight, aux)

  grad_fn = jax.value_and_grad(summed, has_aux=True)
  if grad_accum_steps == 1:
    (loss_sum, (weight, aux)), grads = grad_fn(params, batch, rng)
    return loss_sum, weight, aux, grads

  micro = _split_micro(batch, grad_accum_steps)
  keys = jax.random.split(rng, grad_accum_steps)
  first = jax.tree.map(lambda x: x[0], (micro, keys))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, *first))

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, grad_fn(params, *xs)), None

  ((loss_sum, (weight, aux)), grads), _ = jax.lax.scan(body, zeros, (micro, keys))
  return loss_sum, weight, aux, grads


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    loss_fn: LossFn, schedule: optax.Schedule,
                    grad_accum_steps: int = 1,
                    state_sharding: TrainState | None = None, wrt: Any = nnx.Param) -> StepFn:
  """`state, batch -> state, metrics`, jitted with the state donated.

  Only the params `wrt` selects (`trainable_filter`: LoRA adapters, or all) are differentiated
  and updated; the others pass through unchanged (a LoRA run's frozen base).

  `state_sharding` (`sharding.shardings_of(initial_state)`) pins the output state to the input
  layout, so step 2 never recompiles for a layout XLA picked in step 1. `grad_accum_steps`
  micro-batches are strided row subsets (see `_split_micro`), each spanning all batch devices.

  metrics: `loss` (sum/weight over the whole batch), `grad_norm` (before clipping),
  `learning_rate` (used by this update), `weight` and every aux mean.
  """

  def step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    trainable, frozen = split_trainable(state.params, wrt)
    loss_sum, weight, aux, grads = _accumulated_grads(
        graphdef, loss_fn, trainable, batch, step_rng, grad_accum_steps, frozen)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    params = nnx.merge_state(optax.apply_updates(trainable, updates), frozen)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "weight": weight,
               **{k: v / denom for k, v in aux.items()}}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(step, donate_argnums=0)
  mesh = jax.tree.leaves(state_sharding)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, replicated))


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn
                   ) -> Callable[[nnx.State, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """`params, batch -> (loss_sum, weight)`; callers sum over batches, then divide."""

  def step(params, batch):
    loss_sum, weight, _ = loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(0))
    return loss_sum, weight

  return jax.jit(step)


__all__ = ["LossFn", "MasterParamsState", "StepFn", "TrainState", "init_train_state",
           "make_eval_step", "make_optimizer", "make_schedule", "make_train_step",
           "split_trainable", "trainable_filter", "with_master_params"]
