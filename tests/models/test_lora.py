"""LoRA adapters: equal to the merged dense model, off = the base, only adapters trained, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recllm_jax.errors import ConfigError
from recllm_jax.models import Qwen2ForCausalLM, lora
from recllm_jax.models.config import LORA_TARGETS, parse_lora_targets, tiny
from recllm_jax.train import optim

CFG = tiny(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _ids(batch=2, length=7):
  return jax.random.randint(jax.random.key(1), (batch, length), 0, CFG.vocab_size)


@nnx.jit
def _logits(model, ids):
  return model(ids)


@pytest.fixture(scope="module")
def base():
  return Qwen2ForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def models(base):
  """(base, LoRA model with non-zero B on every target): the LoRA model shares the base's
  weights."""
  model = lora.add_lora(base, 4, 8.0, "q,k,v,o,gate,up,down", seed=1)
  adapters = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters))
  return base, model


def test_new_adapters_leave_the_model_unchanged(base):
  model = lora.add_lora(base, 2, 4.0, "q,v", seed=0)
  assert model.cfg.lora_targets == ("q", "v")
  layer = model.layers[0]
  assert layer.self_attn.q_proj.lora_a[...].shape == (32, 2)
  assert layer.self_attn.q_proj.lora_b[...].shape == (2, 4, 8)  # [r, heads, head_dim]
  assert not hasattr(layer.self_attn.k_proj, "lora_a")
  np.testing.assert_array_equal(_logits(model, _ids()), _logits(base, _ids()))


def test_lora_logits_equal_the_merged_dense_model(models):
  base, model = models
  out = _logits(model, _ids())
  assert float(jnp.abs(out - _logits(base, _ids())).max()) > 1e-2  # the adapters do something
  merged = lora.merge_lora(model)
  assert merged.cfg.lora_rank == 0
  assert not nnx.state(merged, nnx.LoRAParam)  # a plain dense model
  np.testing.assert_allclose(_logits(merged, _ids()), out, atol=2e-5, rtol=1e-5)
  # o_proj's adapter spans two input axes (heads, head_dim): its merge is the same product.
  o = model.layers[0].self_attn.o_proj
  rank = o.lora_a[...].shape[-1]
  expected = o.kernel[...] + o.lora_scale * jnp.einsum("hkr,rd->hkd", o.lora_a[...],
                                                       o.lora_b[...])
  assert rank == 4
  np.testing.assert_allclose(merged.layers[0].self_attn.o_proj.kernel[...], expected, atol=1e-6)


def test_adapters_off_equal_the_base(models):
  base, model = models
  with lora.lora_disabled(model):
    np.testing.assert_array_equal(_logits(model, _ids()), _logits(base, _ids()))
  assert float(jnp.abs(_logits(model, _ids()) - _logits(base, _ids())).max()) > 1e-2  # back on


def test_only_adapters_are_in_the_optimizer_state_and_updated(models):
  _, model = models
  model = lora.merge_lora(model)
  model = lora.add_lora(model, 4, 8.0, ",".join(LORA_TARGETS), seed=3)
  optimizer = optim.make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.0,
                                   max_grad_norm=1.0)
  wrt = optim.trainable_filter(model.cfg)
  assert wrt is nnx.LoRAParam
  graphdef, state = optim.init_train_state(model, optimizer, seed=0, wrt=wrt)
  adapters, base = nnx.split_state(state.params, nnx.LoRAParam, ...)
  n_adapters = len(jax.tree.leaves(adapters))
  assert n_adapters == 2 * 7 * CFG.num_hidden_layers  # A and B of 7 targets per layer
  # Adam's mu and nu: one leaf per adapter each, plus counters; nothing base-shaped.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert len(moments) == 2 * n_adapters
  assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))

  def loss_fn(m, batch, rng):
    logits = m(batch["input_ids"])
    return jnp.sum(logits[..., 0] ** 2), jnp.float32(batch["input_ids"].size), {}

  step = optim.make_train_step(graphdef, optimizer, loss_fn, optax.constant_schedule(1e-2),
                               wrt=wrt)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, {"input_ids": _ids()})
  assert np.isfinite(float(metrics["loss"]))
  after_adapters, after_base = nnx.split_state(state.params, nnx.LoRAParam, ...)
  before_adapters, before_base = nnx.split_state(before, nnx.LoRAParam, ...)
  jax.tree.map(np.testing.assert_array_equal, after_base, before_base)
  # B starts at zero, so step 1 moves every B (A's gradient is x^T (dy B^T) = 0 until B moves).
  flat_after, flat_before = nnx.to_flat_state(after_adapters), nnx.to_flat_state(before_adapters)
  moved = {k[-1] for (k, a), (_, b) in zip(flat_after, flat_before)
           if not np.array_equal(a.get_value(), b.get_value())}
  assert moved == {"lora_b"}


def test_export_merges_the_adapters(models, tmp_path):
  from recllm_jax.models.qwen2_hf import export_hf, load_hf_model

  _, model = models
  export_hf(model, tmp_path / "hf")
  loaded = load_hf_model(tmp_path / "hf")
  assert loaded.cfg.lora_rank == 0
  np.testing.assert_allclose(_logits(loaded, _ids()), _logits(model, _ids()), atol=2e-5,
                             rtol=1e-5)


def test_targets_are_validated_naming_the_key():
  assert parse_lora_targets("v, q") == ("q", "v")
  with pytest.raises(ConfigError, match=r"model.lora.targets='q,qq'.*unknown target\(s\) \['qq'\]"):
    parse_lora_targets("q,qq", key="model.lora.targets")
  with pytest.raises(ConfigError, match="lora_rank=-1"):
    tiny(lora_rank=-1)


def test_grpo_reference_is_the_base_with_adapters_off(base, models):
  """GRPO's reference log-probs of a LoRA policy (`adapters=False`, on the policy's own params,
  no copy) equal the base model's; with adapters on they are the policy's."""
  from recllm_jax.train.grpo import make_logprob_fn

  _, model = models
  ids = _ids(2, 9)
  rows = {"input_ids": ids[:, :-1], "attention_mask": jnp.ones_like(ids[:, :-1]),
          "targets": ids[:, 1:], "completion_mask": jnp.ones((2, 4), jnp.float32)}
  graphdef, params = nnx.split(model, nnx.Param)
  base_graphdef, base_params = nnx.split(base, nnx.Param)
  kw = dict(temperature=1.0, logits_chunk_size=0)
  ref = make_logprob_fn(graphdef, adapters=False, **kw)(params, rows)
  np.testing.assert_allclose(ref, make_logprob_fn(base_graphdef, **kw)(base_params, rows),
                             atol=1e-6)
  policy = make_logprob_fn(graphdef, **kw)(params, rows)
  assert float(jnp.abs(policy - ref).max()) > 1e-3
