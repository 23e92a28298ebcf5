"""Chunked LM-head log-probs: same values and gradients as full logits, without [B, T, V]."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recllm_jax import sharding
from recllm_jax.models import Qwen2ForCausalLM
from recllm_jax.models.config import tiny
from recllm_jax.train.logprobs import (DEFAULT_CHUNK_SIZE, chunked_token_logprobs,
                                       model_token_logprobs, token_logprobs)
from recllm_jax.train.sft import sft_loss_fn
from benchmark_scripts import load_benchmark

VOCAB = 64


def _model(**overrides) -> Qwen2ForCausalLM:
  cfg = tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, **overrides)
  return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(rows: int = 4, length: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
  """Right-padded rows of different lengths; the last 4 real tokens are the completion."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, (rows, length + 1)).astype(np.int32)
  lengths = np.array([length, length - 3, 5, length - 1])[:rows]
  attn = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss = ((np.arange(length)[None] >= lengths[:, None] - 4) & (attn == 1)).astype(np.float32)
  return {"input_ids": ids[:, :-1] * attn, "attention_mask": attn,
          "targets": ids[:, 1:] * attn, "loss_mask": loss}


def _reference(logits, targets, temperature=1.0):
  """Direct log_softmax / gather / -sum p log p on full logits."""
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _assert_grads_close(actual, desired, rel: float = 1e-6):
  """Every leaf within `rel` of its own largest entry.

  Chunking changes the summation order of the LM-head gradient (a sum of per-chunk matmuls
  instead of one), which moves entries by ~1 ulp of the leaf's scale; an elementwise rtol would
  instead demand relative precision of entries that are 1e-4 of their neighbours.
  """
  def check(a, b):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale)
  jax.tree.map(check, actual, desired)


def test_token_logprobs_hand_computed():
  # Uniform over 4 classes: log p = -log 4, entropy log 4. Logits (2, 0, 0, 0) at temperature
  # 2 are (1, 0, 0, 0): p(0) = e / (e + 3).
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])
  logp, ent = token_logprobs(logits, jnp.array([[3, 0]]), temperature=2.0, with_entropy=True)
  p0 = math.e / (math.e + 3)
  np.testing.assert_allclose(logp, [[-math.log(4), math.log(p0)]], rtol=1e-6)
  p_rest = 1 / (math.e + 3)
  expected_ent = -(p0 * math.log(p0) + 3 * p_rest * math.log(p_rest))
  np.testing.assert_allclose(ent, [[math.log(4), expected_ent]], rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    token_logprobs(logits, jnp.array([[3, 0]]), temperature=0.0)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_sft_loss_and_grads_match_full_logits(tie):
  model = _model(tie_word_embeddings=tie)
  graphdef, params = nnx.split(model, nnx.Param)
  batch = _batch()  # T = 11: chunks of 4 leave a partial last chunk

  def loss(p, chunk):
    total, count, _ = sft_loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0),
                                  logits_chunk_size=chunk)
    return total / count

  full, g_full = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  for chunk in (4, 64):  # a partial last chunk; one chunk longer than T
    chunked, g_chunk = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    _assert_grads_close(g_chunk, g_full)
  # The LM head itself gets a (non-zero) gradient through the chunked path.
  head = g_chunk["embed_tokens"]["embedding"] if tie else g_chunk["lm_head"]["kernel"]
  assert float(jnp.abs(head.get_value()).max()) > 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_match_reference(temperature):
  model = _model()
  batch = _batch(seed=1)
  ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
  weights = jnp.asarray(np.random.default_rng(2).normal(size=targets.shape), jnp.float32)

  def objective(m, fn):
    logp, ent = fn(m)
    return jnp.sum(logp * weights) + 0.3 * jnp.sum(ent * weights), (logp, ent)

  def chunked(m):
    hidden = m(ids, mask, return_hidden=True)
    return chunked_token_logprobs(hidden, m.output_head(), jnp.asarray(targets), chunk_size=3,
                                  temperature=temperature, with_entropy=True)

  def reference(m):
    return _reference(m(ids, mask), jnp.asarray(targets), temperature)

  # Jitted: eager op-by-op dispatch of the chunked scan took 13 s of the suite.
  grad = nnx.jit(nnx.grad(objective, has_aux=True), static_argnums=1)
  g_chunk, (logp, ent) = grad(model, chunked)
  g_ref, (logp_ref, ent_ref) = grad(model, reference)
  np.testing.assert_allclose(logp, logp_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent, ent_ref, rtol=1e-6, atol=1e-6)
  assert float(ent.min()) > 0 and float(ent.max()) < math.log(VOCAB) + 1e-5
  _assert_grads_close(nnx.state(g_chunk, nnx.Param), nnx.state(g_ref, nnx.Param))


def _policy_value_and_grad(graphdef, state, batch, chunk):
  """A GRPO-like objective: temperature log-probs plus an entropy bonus over completion tokens."""
  def objective(state):
    logp, ent = model_token_logprobs(nnx.merge(graphdef, state), batch["input_ids"],
                                     batch["attention_mask"], batch["targets"], chunk_size=chunk,
                                     temperature=0.7, with_entropy=True)
    return jnp.sum((logp + 0.1 * ent) * batch["loss_mask"])
  return jax.value_and_grad(objective)(state)


def test_chunked_logprobs_and_grads_on_a_mesh_match_one_device():
  # Batch split over data x fsdp (the chunk loop runs per batch shard), vocab over tensor.
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = _model().cfg
  batch = _batch()
  step = jax.jit(_policy_value_and_grad, static_argnums=(0, 3))
  graphdef, state = nnx.split(_model(), nnx.Param)
  ref_value, ref_grads = step(graphdef, state, batch, 0)
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(model, nnx.Param)
  rows = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    value, grads = step(graphdef, state, jax.device_put(batch, rows), 4)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  _assert_grads_close(grads, ref_grads)


def _vocab_memory_benchmark():
  return load_benchmark("vocab_memory")


def test_chunked_loss_gradient_never_holds_full_logits():
  # A 151,936-token vocabulary with everything else tiny, so the logits dominate the compiled
  # step's temp buffers (XLA's own accounting; nothing is allocated).
  bench = _vocab_memory_benchmark()
  cfg = bench.small_model_config(hidden=64, layers=1)
  batch, length = 4, 512
  logits_bytes = batch * length * cfg.vocab_size * 4  # one [B, T, V] fp32 array: 1.24 GB
  full = bench.sft_grad_temp_bytes(cfg, batch, length, chunk_size=0)
  chunked = bench.sft_grad_temp_bytes(cfg, batch, length, chunk_size=DEFAULT_CHUNK_SIZE)
  assert full > logits_bytes  # the full path holds the logits and their gradient
  assert chunked < logits_bytes
  # ~2 [B, C, V] arrays instead of ~2 [B, T, V]: T / C = 4 here.
  assert chunked < full / 3, (full, chunked)


def test_rejects_bad_chunk_size_and_shapes():
  model = _model()
  hidden = jnp.zeros((2, 5, 32))
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_token_logprobs(hidden, model.output_head(), jnp.zeros((2, 5), jnp.int32),
                           chunk_size=0)
  with pytest.raises(ValueError, match="targets"):
    chunked_token_logprobs(hidden, model.output_head(), jnp.zeros((2, 4), jnp.int32),
                           chunk_size=2)
  with pytest.raises(ValueError, match="chunk_size"):
    model_token_logprobs(model, jnp.zeros((2, 5), jnp.int32), None,
                         jnp.zeros((2, 5), jnp.int32), chunk_size=-1)


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_last_positions_only_equal_the_tail_of_all_positions(chunk_size):
  from recllm_jax.train.logprobs import model_token_logprobs

  model = _model()
  batch = _batch(seed=3)
  ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
  full, full_ent = _reference(model(ids, mask), jnp.asarray(targets), 0.7)
  logp, ent = model_token_logprobs(model, ids, mask, targets, chunk_size=chunk_size,
                                   temperature=0.7, with_entropy=True, last=5)
  assert logp.shape == (4, 5)
  np.testing.assert_allclose(logp, full[:, -5:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent, full_ent[:, -5:], rtol=1e-6, atol=1e-6)
