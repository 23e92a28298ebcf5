"""`recllm_jax.decoding.generate`: parity with transformers, sampling statistics, bucketing, mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats
import torch

from recllm_jax import sharding
from recllm_jax.decoding import bucket_length, compile_count, generate
from recllm_jax.models.qwen2_hf import load_hf_model


def _prompts(seed: int, batch: int = 3, length: int = 9, pads=(0, 3, 6), vocab: int = 128):
  """Left-padded prompts of mixed lengths (pad id 0, real tokens >= 3)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  for b, p in enumerate(pads[:batch]):
    mask[b, :p] = 0
  ids[mask == 0] = 0
  return ids, mask


def _hf_greedy(model, ids, mask, max_new_tokens, eos):
  out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                       max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[:, ids.shape[1]:].numpy()
  logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()  # [B, M', V]
  return tokens, logprobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, build_hf_model):
  hf = build_hf_model(0)
  path = tmp_path_factory.mktemp("gen") / "hf"
  hf.save_pretrained(path)
  return path, hf, load_hf_model(path)


def test_bucket_length():
  assert [bucket_length(n) for n in (1, 64, 65, 128, 129, 1024, 1025)] == [
      64, 64, 128, 128, 256, 1024, 1536]


def test_greedy_matches_transformers_without_eos(tiny):
  _, hf, model = tiny
  ids, mask = _prompts(1)
  out = generate(model, ids, mask, max_new_tokens=16)
  ref, ref_logp = _hf_greedy(hf, ids, mask, 16, eos=None)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  np.testing.assert_array_equal(np.asarray(out.lengths), [16, 16, 16])
  # Greedy log-probs are the model's own log-softmax at the chosen token.
  want = np.take_along_axis(ref_logp, ref[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=2e-5)


def test_greedy_matches_transformers_with_eos(tiny):
  _, hf, model = tiny
  ids, mask = _prompts(2)
  free, _ = _hf_greedy(hf, ids, mask, 16, eos=None)
  # A random model never emits the configured EOS, so declare EOS = a token row 0 emits at step 4
  # (and a second id from row 2, to exercise a list of EOS ids).
  eos = [int(free[0, 4]), int(free[2, 9])]
  out = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
  ref, ref_logp = _hf_greedy(hf, ids, mask, 16, eos=eos)
  tokens = np.asarray(out.tokens)
  ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])))  # HF stops when all rows are done
  np.testing.assert_array_equal(tokens, ref)
  lengths = np.asarray(out.lengths)
  assert lengths[0] <= 5
  for b in range(3):
    hits = np.flatnonzero(np.isin(tokens[b], eos))
    assert lengths[b] == (hits[0] + 1 if hits.size else 16)
    assert (tokens[b, lengths[b]:] == 0).all()
    assert (np.asarray(out.logprobs)[b, lengths[b]:] == 0).all()


def test_remat_model_decodes_like_the_plain_one(tiny):
  """`model.remat` (the 1.5B presets' default) only changes the backward pass: a remat model
  decodes (GRPO rollouts) the same tokens, where nnx.remat inside the decode loop used to
  fail with a TraceContextError."""
  path, _, model = tiny
  ids, mask = _prompts(2)
  plain = generate(model, ids, mask, max_new_tokens=8)
  remat = generate(load_hf_model(path, remat=True), ids, mask, max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(remat.tokens), np.asarray(plain.tokens))


def test_num_samples_rows_follow_prompts(tiny):
  _, _, model = tiny
  ids, mask = _prompts(3)
  single = generate(model, ids, mask, max_new_tokens=6)
  grouped = generate(model, ids, mask, max_new_tokens=6, num_samples=3)
  np.testing.assert_array_equal(np.asarray(grouped.tokens),
                                np.repeat(np.asarray(single.tokens), 3, axis=0))
  # A group reads its prompt from one shared prefix cache: the same log-probs as a lone row.
  np.testing.assert_allclose(np.asarray(grouped.logprobs),
                             np.repeat(np.asarray(single.logprobs), 3, axis=0), atol=1e-6)
  sampled = generate(model, ids, mask, max_new_tokens=6, num_samples=4, temperature=1.0,
                     rng=jax.random.key(0))
  assert np.asarray(sampled.tokens).shape == (12, 6)
  # Samples of one prompt differ (independent draws), nothing is shared across the group.
  assert len({tuple(r) for r in np.asarray(sampled.tokens)[:4]}) > 1


def test_same_bucket_reuses_one_program(tiny):
  _, _, model = tiny
  generate(model, *_prompts(4, length=10, pads=(0, 2, 5)), max_new_tokens=5)
  before = compile_count()
  generate(model, *_prompts(5, length=23, pads=(0, 9, 1)), max_new_tokens=5)
  generate(model, *_prompts(6, length=40, pads=(3, 0, 0)), max_new_tokens=5)
  assert compile_count() == before
  generate(model, *_prompts(7, length=70, pads=(3, 0, 0)), max_new_tokens=5)  # next bucket
  assert compile_count() == before + 1


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.8), (1.2, 6, 0.7)])
def test_sampling_matches_renormalised_distribution(hf_checkpoint, temperature, top_k, top_p):
  path, hf = hf_checkpoint(vocab_size=16, seed=1)
  # Flatten the logits so that several tokens carry real mass (a sharp test).
  with torch.no_grad():
    hf.lm_head.weight.mul_(0.05)
  hf.save_pretrained(path)
  model = load_hf_model(path)
  ids, mask = _prompts(8, batch=1, length=5, pads=(0,), vocab=16)
  draws = 4000
  out = generate(model, ids, mask, max_new_tokens=2, rng=jax.random.key(42),
                 temperature=temperature, top_k=top_k, top_p=top_p, num_samples=draws)
  tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)

  def exact(prefix):
    with torch.no_grad():
      logits = hf(torch.tensor(prefix)).logits[:, -1].double().numpy() / temperature
    order = np.argsort(-logits, axis=-1)
    keep = np.zeros_like(logits, bool)
    for r in range(len(logits)):
      ranked = order[r][:top_k] if top_k else order[r]
      p = np.exp(logits[r, ranked] - logits[r, ranked].max())
      p /= p.sum()
      mass_before = np.cumsum(p) - p
      keep[r, ranked[mass_before < top_p]] = True
    z = np.where(keep, logits, -np.inf)
    return np.exp(z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
                  - z.max(-1, keepdims=True))

  p0 = exact(ids)[0]  # [V]
  counts = np.bincount(tokens[:, 0], minlength=16)
  support = p0 > 0
  assert counts[~support].sum() == 0
  assert scipy.stats.chisquare(counts[support], p0[support] * draws).pvalue > 1e-3
  np.testing.assert_allclose(logprobs[:, 0], np.log(p0[tokens[:, 0]]), atol=1e-5)
  # Second step (inside the decode loop): log-probs of a few rows against an exact recompute.
  rows = np.arange(0, draws, 500)
  prefixes = np.concatenate([np.repeat(ids, len(rows), 0), tokens[rows, :1]], axis=1)
  p1 = exact(prefixes)
  np.testing.assert_allclose(logprobs[rows, 1], np.log(p1[np.arange(len(rows)), tokens[rows, 1]]),
                             atol=1e-5)


def test_sharded_mesh_matches_single_device(tiny):
  path, _, model = tiny
  ids, mask = _prompts(9, batch=4, pads=(0, 3, 6, 1))
  ref = generate(model, ids, mask, max_new_tokens=8, num_samples=2)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_hf_model(path, mesh=mesh)
  with jax.set_mesh(mesh):
    out = generate(sharded, ids, mask, max_new_tokens=8, num_samples=2)
    sampled = generate(sharded, ids, mask, max_new_tokens=8, num_samples=2, temperature=1.0,
                       rng=jax.random.key(3))
  np.testing.assert_array_equal(sharding.host_array(out.tokens), np.asarray(ref.tokens))
  assert len(out.tokens.sharding.device_set) == 8
  assert np.isfinite(sharding.host_array(sampled.logprobs)).all()


def test_argument_errors(tiny):
  _, _, model = tiny
  ids, mask = _prompts(10)
  with pytest.raises(ValueError, match="rng"):
    generate(model, ids, mask, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, ids, mask, max_new_tokens=2, temperature=1.0, top_p=0.0,
             rng=jax.random.key(0))
