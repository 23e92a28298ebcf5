"""Gradient accumulation on a mesh: every micro-batch spans all batch devices, same step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from recllm_jax import sharding
from recllm_jax.models import Qwen2ForCausalLM
from recllm_jax.models.config import tiny
from recllm_jax.train import optim
from recllm_jax.train.sft import sft_loss_fn

ROWS, LENGTH = 32, 8


def test_split_micro_is_strided():
  # Row r of the batch goes to micro-batch r % n, so each device's contiguous block of rows
  # feeds every micro-batch.
  batch = {"x": np.arange(8 * 3).reshape(8, 3)}
  micro = optim._split_micro(batch, 4)["x"]  # [4, 2, 3]
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1], batch["x"][1::4])
  np.testing.assert_array_equal(micro[3], batch["x"][3::4])


def _batch(mesh):
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 64, (ROWS, LENGTH + 1)).astype(np.int32)
  lengths = rng.integers(LENGTH // 2, LENGTH + 1, ROWS)
  attn = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  loss = ((np.arange(LENGTH)[None] >= lengths[:, None] - 3) & (attn == 1)).astype(np.float32)
  batch = {"input_ids": ids[:, :-1] * attn, "attention_mask": attn,
           "targets": ids[:, 1:] * attn, "loss_mask": loss}
  return jax.device_put(batch, jax.NamedSharding(mesh, P(("data", "fsdp"))))


def _step(mesh, grad_accum_steps, micro_shardings):
  cfg = tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2)
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)

  def loss_fn(model, batch, rng):
    # The layout of each micro-batch as the loss sees it inside the scan (compile time).
    jax.debug.inspect_array_sharding(batch["input_ids"], callback=micro_shardings.append)
    return sft_loss_fn(model, batch, rng)

  # Plain SGD with lr 1: the parameter change is exactly the (mean) gradient.
  schedule = optax.constant_schedule(1.0)
  graphdef, state = optim.init_train_state(model, optax.sgd(schedule), seed=0)
  step = optim.make_train_step(graphdef, optax.sgd(schedule), loss_fn, schedule,
                               grad_accum_steps, sharding.shardings_of(state))
  with jax.set_mesh(mesh):
    state, metrics = step(state, _batch(mesh))
  return jax.device_get(metrics), jax.device_get(state.params)


def test_micro_batches_span_all_batch_devices_and_match_one_batch():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  seen = []
  ref_metrics, ref_params = _step(mesh, 1, seen)
  for accum in (2, 4):
    seen.clear()
    metrics, params = _step(mesh, accum, seen)
    (micro,) = seen
    # [ROWS / accum, LENGTH] split over all 8 devices: never a subset, never replicated.
    assert micro.spec == P(("data", "fsdp"))
    assert micro.shard_shape((ROWS // accum, LENGTH)) == (ROWS // accum // 8, LENGTH)
    assert float(metrics["weight"]) == float(ref_metrics["weight"])
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(ref_metrics["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 params, ref_params)
