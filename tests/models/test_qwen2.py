"""Logit parity of the Flax Qwen2 with transformers' PyTorch Qwen2ForCausalLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import recllm_jax
from recllm_jax.models.qwen2 import apply_rope, rope_cos_sin

TOL_FP32 = 1e-4
# bf16 has an 8-bit mantissa: relative error ~4e-3 per op, compounded over the layers. We
# bound the error relative to the logits' scale (documented in the README).
TOL_BF16_REL = 5e-2


def _batch(seed, batch=3, length=11, vocab=128, pads=(0, 3, 7)):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (batch, length))
  mask = np.ones_like(ids)
  for row, pad in enumerate(pads[:batch]):
    mask[row, :pad] = 0
    ids[row, :pad] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  # HF only derives positions from the mask inside generate(); pass them explicitly.
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()


def _max_diff(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_logit_parity_left_padded(hf_checkpoint, tie, heads, kv_heads):
  path, ref = hf_checkpoint(tie_word_embeddings=tie, num_attention_heads=heads,
                            num_key_value_heads=kv_heads)
  model = recllm_jax.load_hf_model(path)
  ids, mask = _batch(heads + kv_heads)
  logits = model(jnp.asarray(ids), jnp.asarray(mask))
  assert logits.shape == (3, 11, 128) and logits.dtype == jnp.float32
  assert _max_diff(logits, _torch_logits(ref, ids, mask), mask) <= TOL_FP32


def test_left_padding_does_not_change_real_token_logits(hf_checkpoint):
  path, _ = hf_checkpoint()
  model = recllm_jax.load_hf_model(path)
  ids, mask = _batch(1, batch=2, pads=(0, 4))
  ids[1, 4:] = ids[0, :7]
  padded = model(jnp.asarray(ids), jnp.asarray(mask))
  alone = model(jnp.asarray(ids[:1, :7]))
  np.testing.assert_allclose(padded[1, 4:], alone[0], atol=1e-5)


def test_bf16_compute_within_documented_tolerance(hf_checkpoint):
  path, ref = hf_checkpoint()
  model = recllm_jax.load_hf_model(path, dtype=jnp.bfloat16)
  ids, mask = _batch(2)
  expected = _torch_logits(ref, ids, mask)
  rel = _max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), expected, mask) / np.abs(
      expected).max()
  assert rel <= TOL_BF16_REL
  # fp32 params with bf16 compute is at least as accurate.
  mixed = recllm_jax.load_hf_model(path, compute_dtype=jnp.bfloat16)
  assert mixed.embed_tokens.embedding.get_value().dtype == jnp.float32
  rel_mixed = _max_diff(mixed(jnp.asarray(ids), jnp.asarray(mask)), expected, mask) / np.abs(
      expected).max()
  assert rel_mixed <= TOL_BF16_REL


def test_kv_cache_prefill_then_decode_matches_full_forward(hf_checkpoint):
  path, _ = hf_checkpoint()
  model = recllm_jax.load_hf_model(path)
  ids, mask = _batch(3, length=12)
  full = model(jnp.asarray(ids), jnp.asarray(mask))
  cache = model.init_cache(3, 16)
  prefix = 8
  logits, cache = model(jnp.asarray(ids[:, :prefix]), jnp.asarray(mask[:, :prefix]), cache=cache)
  steps = [logits]
  for t in range(prefix, 12):
    step, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache=cache)
    steps.append(step)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.next_positions(), mask.sum(-1))
  incremental = jnp.concatenate(steps, axis=1)
  assert _max_diff(incremental, full, mask) <= 1e-5


def test_remat_gives_identical_loss_and_grads(hf_checkpoint):
  path, _ = hf_checkpoint()
  ids, mask = _batch(4)

  def loss_and_grads(model):
    def loss(m):
      return jnp.mean(m(jnp.asarray(ids), jnp.asarray(mask)) ** 2)
    return nnx.value_and_grad(loss)(model)

  plain = loss_and_grads(recllm_jax.load_hf_model(path))
  remat = loss_and_grads(recllm_jax.load_hf_model(path, remat=True))
  np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rope_rotates_pairs_by_position_times_frequency():
  # Hand-computed: head_dim 4 -> frequencies (1, theta^-1/2); pairs are (x0, x2) and (x1, x3).
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  cos, sin = rope_cos_sin(jnp.array([[3]]), head_dim=4, theta=100.0)
  out = np.asarray(apply_rope(x, cos, sin)).reshape(4)
  a0, a1 = 3.0, 3.0 / 10.0
  expected = [1 * np.cos(a0) - 3 * np.sin(a0), 2 * np.cos(a1) - 4 * np.sin(a1),
              3 * np.cos(a0) + 1 * np.sin(a0), 4 * np.cos(a1) + 2 * np.sin(a1)]
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_dropout_is_training_only_and_scales_the_kept_units():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from recllm_jax.models import config as model_config
  from recllm_jax.models.qwen2 import Qwen2ForCausalLM

  cfg = model_config.tiny(vocab_size=64, num_hidden_layers=2, dropout=0.5)
  model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  plain = model(ids)
  # No rng: deterministic, and equal to the same weights without dropout configured.
  np.testing.assert_array_equal(plain, model(ids))
  same = Qwen2ForCausalLM(cfg.replace(dropout=0.0), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(plain, same(ids, dropout_rng=jax.random.key(1)))
  a = model(ids, dropout_rng=jax.random.key(1))
  b = model(ids, dropout_rng=jax.random.key(2))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, model(ids, dropout_rng=jax.random.key(1)))  # reproducible
  # Inverted dropout keeps the expectation: the mean over many masks approaches the plain forward.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, cfg.hidden_size)), jnp.float32)
  from recllm_jax.models.qwen2 import _dropout
  keys = jax.random.split(jax.random.key(3), 4000)
  mean = jnp.mean(jax.vmap(lambda k: _dropout(x, (k, 0.5), k))(keys), axis=0)
  np.testing.assert_allclose(mean, x, atol=0.1)
