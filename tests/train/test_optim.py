"""Gradient accumulation on a mesh: every micro-batch spans all batch devices, same step."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
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


# ~20 s; tests/train/test_sft.py checks accumulation = one big batch in the default suite.
@pytest.mark.slow
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


# --- mixed precision: bf16 params with an fp32 master copy ------------------------------------


def _sgd_steps(params, optimizer, grad, steps):
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    updates, state = optimizer.update(jax.tree.map(lambda p: jnp.full_like(p, grad), params),
                                      state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_master_copy_accumulates_updates_below_bf16_resolution():
  # bf16 has 8 significant bits: the neighbours of 1.0 are 1 - 2^-8 and 1 + 2^-7. An update of
  # +1e-4 is below half a step, so bf16 params round it away every time; the fp32 master keeps
  # all 100 of them (~1.01) and the params follow its rounding, 1 + 2^-7 = 1.0078125. The
  # gradient is bf16 like the params': 1e-4 is stored as 210 * 2^-21 = 1.0014e-4.
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  sgd = optax.sgd(1.0)
  plain, _ = _sgd_steps(params, sgd, -1e-4, 100)
  np.testing.assert_array_equal(plain["w"], np.ones(3))
  mixed, state = _sgd_steps(params, optim.with_master_params(sgd, jnp.float32), -1e-4, 100)
  assert mixed["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(state.master["w"], 1 + 100 * 210 * 2.0**-21, rtol=1e-6)
  assert state.master["w"].dtype == jnp.float32
  np.testing.assert_array_equal(mixed["w"].astype(np.float32), np.full(3, 1.0078125))


def _data_iterator():
  import grain

  return iter(grain.MapDataset.range(4).to_iter_dataset())


def test_master_copy_is_sharded_like_the_params_and_survives_a_checkpoint(tmp_path):
  from recllm_jax.train.checkpoint import Checkpointer

  mesh = sharding.make_mesh(data=2, fsdp=4)
  cfg = tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, param_dtype="bfloat16",
             dtype="bfloat16")
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  schedule = optax.constant_schedule(1e-3)
  optimizer = optim.make_optimizer(schedule, weight_decay=0.1, max_grad_norm=1.0,
                                   master_dtype="float32")
  graphdef, state = optim.init_train_state(model, optimizer, seed=0)
  step = optim.make_train_step(graphdef, optimizer, sft_loss_fn, schedule, 1,
                               sharding.shardings_of(state))
  with jax.set_mesh(mesh):
    state, _ = step(state, _batch(mesh))
  master, mu = state.opt_state.master, state.opt_state.inner[1][0].mu
  for p, m, u in zip(jax.tree.leaves(state.params), jax.tree.leaves(master), jax.tree.leaves(mu)):
    assert (p.dtype, m.dtype, u.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    assert m.sharding == p.sharding and u.sharding == p.sharding  # FSDP, not replicated
    np.testing.assert_array_equal(p, m.astype(jnp.bfloat16))  # params = master rounded
  assert any(np.any(m != p.astype(jnp.float32))  # the master holds what bf16 cannot
             for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(master)))

  # Resume restores the master itself, not a copy of the rounded params.
  ckpt = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
  ckpt.save(1, state, _data_iterator(), force=True)
  _, fresh = optim.init_train_state(model, optimizer, seed=0)
  restored = ckpt.restore(1, fresh, _data_iterator())
  ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored.opt_state.master,
               master)
  assert jax.tree.leaves(restored.opt_state.master)[0].sharding == jax.tree.leaves(master)[0].sharding


# Loss curves of the tiny SFT setup (tests/train/test_loop.py) in each precision, against fp32.
# Tolerance: 2^-8 of the fp32 loss, bf16's unit roundoff -- the curves must agree to what bf16
# can represent of the loss value itself. Measured over 30 steps (2 cores, jax 0.10.2): bf16
# compute 4.7e-4, bf16 params + fp32 master 5.2e-4 (max relative deviation), 8x inside; bf16
# params without a master drift to 1.4e-2 (norm scales near 1 never move: Adam steps of
# ~lr = 3e-3 are below half a bf16 step there), so the bound does tell the cases apart.
PRECISIONS = {
    "bf16 compute, fp32 params": {"model.dtype": "bfloat16"},
    "bf16 params, fp32 master": {"model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
                                 "train.master_dtype": "float32"},
}
CURVE_STEPS = 20


@pytest.fixture(scope="module")
def fp32_curve(tmp_path_factory):
  import sys

  from recllm_jax.data.synthetic import generate_synthetic

  sys.path.insert(0, str(Path(__file__).parent))
  from test_loop import make_config  # the small, seconds-long SFT setup

  root = tmp_path_factory.mktemp("precision")
  data = generate_synthetic(root / "data", num_items=60, num_users=50, seed=0)

  def curve(name, **overrides):
    from recllm_jax.train.loop import train

    workdir = root / name.replace(" ", "_").replace(",", "")
    train(make_config(workdir, data, **{"train.num_steps": CURVE_STEPS,
                                        "train.checkpoint_every": 0, **overrides}))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows])  # [CURVE_STEPS]

  return curve("fp32"), curve


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_bf16_loss_curve_tracks_fp32(fp32_curve, name):
  reference, curve = fp32_curve
  losses = curve(name, **PRECISIONS[name])
  assert losses.shape == reference.shape == (CURVE_STEPS,)
  np.testing.assert_allclose(losses, reference, rtol=2.0**-8, atol=0)


@pytest.mark.slow  # ~15-30 s of bf16 CPU matmuls; the hand-made example above is the fast check
def test_bf16_params_without_master_drift_beyond_the_tolerance(fp32_curve):
  reference, curve = fp32_curve
  losses = curve("bf16 params", **{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16"})
  assert np.max(np.abs(losses - reference) / reference) > 2.0**-8
