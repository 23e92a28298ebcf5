"""SFT loss, optimizer and the jitted update step (grad accumulation, bf16, remat, sharding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recllm_jax import sharding
from recllm_jax.models import Qwen2ForCausalLM
from recllm_jax.models.config import tiny
from recllm_jax.train import optim
from recllm_jax.train.sft import sft_loss, sft_loss_fn, token_cross_entropy


def test_sft_loss_matches_hand_computation():
  # Two positions with uniform logits over 4 classes (CE = log 4), one with a confident
  # correct logit, and one masked position that must not count.
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0],
                       [10.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 100.0]]])
  targets = jnp.array([[1, 0, 3, 0]])
  mask = jnp.array([[1, 1, 1, 0]])
  confident = -math.log(math.exp(10) / (math.exp(10) + 3))
  expected = (2 * math.log(4) + confident) / 3
  assert float(sft_loss(logits, targets, mask)) == pytest.approx(expected, rel=1e-6)
  ce = token_cross_entropy(logits, targets)
  assert float(ce[0, 3]) == pytest.approx(100.0, rel=1e-6)
  assert float(sft_loss(logits, targets, jnp.zeros_like(mask))) == 0.0


def _model(**overrides):
  cfg = tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, **overrides)
  return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(rows=8, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 64, (rows, length + 1)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, rows)
  attn = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  # Completion = the last 3 real tokens, so rows have different numbers of loss tokens.
  loss = ((np.arange(length)[None] >= lengths[:, None] - 3) & (attn == 1)).astype(np.float32)
  loss[0, :] = 0  # a row without completion tokens must get zero weight
  return {"input_ids": ids[:, :-1] * attn, "attention_mask": attn,
          "targets": ids[:, 1:] * attn, "loss_mask": loss}


def _optimizer(lr=1e-2):
  schedule = optim.make_schedule(lr, num_steps=10, warmup_steps=0)
  return schedule, optim.make_optimizer(schedule, weight_decay=0.1, max_grad_norm=1.0)


def test_grad_accumulation_equals_one_big_batch():
  batch = _batch()
  results = []
  for accum in (1, 4):
    # Plain SGD: the parameter change *is* the gradient (Adam's first step is ~sign(g), which
    # amplifies float noise in near-zero gradients).
    schedule = optax.constant_schedule(1.0)
    opt = optax.sgd(schedule)
    graphdef, state = optim.init_train_state(_model(), opt, seed=0)
    step = optim.make_train_step(graphdef, opt, sft_loss_fn, schedule, accum)
    state, metrics = step(state, batch)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m1, p1), *others = results
  # Reference: the plain mean over all completion tokens of the whole batch.
  model = _model()
  ref = sft_loss(model(batch["input_ids"], batch["attention_mask"]), batch["targets"],
                 batch["loss_mask"])
  assert float(m1["loss"]) == pytest.approx(float(ref), rel=1e-6)
  for m, p in others:
    assert float(m["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p1)


@pytest.mark.parametrize("overrides", [{}, {"dtype": "bfloat16", "remat": True}])
def test_train_step_fits_a_batch_on_a_mesh(overrides):
  mesh = sharding.make_mesh(data=2, fsdp=-1)
  cfg = _model(**overrides).cfg
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  schedule, opt = _optimizer(lr=3e-3)
  graphdef, state = optim.init_train_state(model, opt, seed=0)
  step = optim.make_train_step(graphdef, opt, sft_loss_fn, schedule,
                               state_sharding=sharding.shardings_of(state))
  batch = jax.device_put(_batch(), jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(10):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  assert int(state.step) == 10
  # Optimizer moments keep the parameters' (FSDP) sharding.
  emb = state.params["embed_tokens"]["embedding"].get_value()
  adam = state.opt_state[1][0]
  assert not emb.sharding.is_fully_replicated
  assert adam.mu["embed_tokens"]["embedding"].get_value().sharding == emb.sharding
  assert adam.nu["layers"][0]["mlp"]["up_proj"]["kernel"].get_value().sharding == (
      state.params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value().sharding)


def test_train_step_donates_state():
  schedule, opt = _optimizer()
  graphdef, state = optim.init_train_state(_model(), opt, seed=0)
  step = optim.make_train_step(graphdef, opt, sft_loss_fn, schedule)
  old = state.params["norm"]["scale"].get_value()
  step(state, _batch())
  assert old.is_deleted()


def test_schedule_warmup_then_cosine():
  s = optim.make_schedule(1.0, num_steps=110, warmup_steps=10, min_lr_ratio=0.1)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.55, rel=1e-5)
  assert float(s(110)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_skips_biases_and_norms():
  params = nnx.state(_model(), nnx.Param)
  mask = optim._decay_mask(params)
  assert mask["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value() is True
  assert mask["layers"][0]["self_attn"]["q_proj"]["bias"].get_value() is False
  assert mask["norm"]["scale"].get_value() is False


def test_optimizer_clips_the_global_norm_before_adam():
  # Adam's first update is -lr * g / (|g| + eps) elementwise; with eps = 1 its size shows which
  # gradient Adam saw. {a: 6, b: 8} has global norm 10, clipped to 1 it is {a: 0.6, b: 0.8};
  # clipping each leaf separately would give 1 and 1, no clipping 6 and 8.
  grads = {"a": jnp.array([6.0]), "b": jnp.array([8.0])}

  def first_update(max_grad_norm: float) -> list[float]:
    opt = optim.make_optimizer(optax.constant_schedule(1.0), weight_decay=0.0,
                               max_grad_norm=max_grad_norm, eps=1.0)
    updates, _ = opt.update(grads, opt.init(grads), grads)
    return [float(updates[k][0]) for k in ("a", "b")]

  assert first_update(1.0) == pytest.approx([-0.6 / 1.6, -0.8 / 1.8])
  assert first_update(20.0) == pytest.approx([-6 / 7, -8 / 9])  # under the bound: untouched
  assert first_update(0.0) == pytest.approx([-6 / 7, -8 / 9])  # 0 disables clipping
