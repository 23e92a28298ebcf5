"""Constrained beam search against brute-force scoring of every catalog item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recllm_jax import constraints as cons
from recllm_jax.decoding import beam_search, generate
from recllm_jax.models.qwen2_hf import load_hf_model

EOS, VOCAB = 2, 32


def _catalog(seed: int = 0, n: int = 14) -> list[tuple[int, ...]]:
  rng = np.random.default_rng(seed)
  seqs = {tuple(int(t) for t in rng.integers(4, 10, size=rng.integers(1, 5))) for _ in range(n)}
  seqs |= {(4,), (4, 5), (4, 5, 6)}  # titles that are prefixes of titles
  return sorted(seqs)


def _sid_catalog(seed: int = 0, n: int = 20) -> list[tuple[int, ...]]:
  """Semantic-ID-shaped items: one token per level from disjoint ranges (a: 4-6, b: 7-9,
  c: 10-13), and a fourth level on a colliding pair, as `SidCodec` writes them."""
  rng = np.random.default_rng(seed)
  seqs = {(int(rng.integers(4, 7)), int(rng.integers(7, 10)), int(rng.integers(10, 14)))
          for _ in range(n)}
  shared = sorted(seqs)[0]
  seqs.discard(shared)
  seqs |= {shared + (14,), shared + (15,)}
  return sorted(seqs)


def _brute_force(hf, prompt: np.ndarray, seqs) -> np.ndarray:
  """Sum of model log-probs of `title + EOS` after the prompt, for every title."""
  scores = []
  with torch.no_grad():
    for s in seqs:
      full = torch.tensor([list(prompt) + list(s) + [EOS]])
      logp = torch.log_softmax(hf(full).logits[0, len(prompt) - 1:-1].double(), -1)
      scores.append(float(logp[torch.arange(len(s) + 1), full[0, len(prompt):]].sum()))
  return np.array(scores)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, build_hf_model):
  hf = build_hf_model(3, vocab_size=VOCAB)
  path = tmp_path_factory.mktemp("beam") / "hf"
  hf.save_pretrained(path)
  return hf, load_hf_model(path)


@pytest.mark.parametrize("make_catalog", [_catalog, _sid_catalog], ids=["titles", "sids"])
def test_constrained_beams_are_the_exact_top_k(tiny, make_catalog):
  hf, model = tiny
  seqs = make_catalog()
  trie = cons.ItemTrie(seqs, VOCAB)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS)
  prompts = [np.array([11, 12, 13, 14, 15]), np.array([20, 21, 22])]
  ids = np.zeros((2, 5), np.int64)
  mask = np.zeros((2, 5), np.int64)
  for b, p in enumerate(prompts):
    ids[b, 5 - len(p):], mask[b, 5 - len(p):] = p, 1
  k = 5
  # With as many beams as items nothing is ever pruned, so beam search is exact.
  out = beam_search(model, ids, mask, constraint=constraint, num_beams=len(seqs), num_return=k,
                    max_new_tokens=6)
  tokens, scores, lengths = map(np.asarray, (out.tokens, out.scores, out.lengths))
  for b, p in enumerate(prompts):
    brute = _brute_force(hf, p, seqs)
    best = np.argsort(-brute)[:k]
    got = [tuple(tokens[b, r, :lengths[b, r] - 1]) for r in range(k)]
    assert got == [seqs[i] for i in best]
    assert (tokens[b, np.arange(k), lengths[b] - 1] == EOS).all()
    np.testing.assert_allclose(scores[b], brute[best], atol=1e-4)
    assert (np.diff(scores[b]) <= 0).all()
    assert [trie.leaf_sequences[l] for l in np.asarray(out.items)[b]] == got


def test_narrow_beams_give_valid_distinct_sorted_items_and_respect_history(tiny):
  hf, model = tiny
  seqs = _catalog(1, n=30)
  trie = cons.ItemTrie(seqs, VOCAB)
  ids = np.array([[0, 11, 12, 13], [21, 22, 23, 24]])
  history = np.array([[0, 1], [-1, -1]])
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS, history=history)
  out = beam_search(model, ids, (ids > 0).astype(int), constraint=constraint, num_beams=6,
                    num_return=4, max_new_tokens=6)
  tokens, scores, lengths = map(np.asarray, (out.tokens, out.scores, out.lengths))
  for b in range(2):
    got = [tuple(tokens[b, r, :lengths[b, r] - 1]) for r in range(4)]
    assert len(set(got)) == 4 and all(g in seqs for g in got)
    assert not {seqs[i] for i in history[b] if i >= 0} & set(got)
    assert (np.diff(scores[b]) <= 0).all() and np.isfinite(scores[b]).all()
    brute = _brute_force(hf, ids[b][ids[b] > 0], got)
    np.testing.assert_allclose(scores[b], brute, atol=1e-4)


def test_fewer_items_than_requested_pads_with_minus_inf(tiny):
  _, model = tiny
  trie = cons.ItemTrie([(5, 6), (7,)], VOCAB)
  out = beam_search(model, np.array([[9, 10]]), np.ones((1, 2)), num_beams=4, num_return=3,
                    constraint=cons.CatalogConstraint(trie, eos_token_id=EOS), max_new_tokens=4)
  scores = np.asarray(out.scores)[0]
  assert np.isfinite(scores[:2]).all() and scores[2] == -np.inf


def test_unconstrained_single_beam_is_greedy(tiny):
  _, model = tiny
  ids = np.array([[0, 11, 12, 13], [21, 22, 23, 24]])
  mask = (ids > 0).astype(int)
  greedy = generate(model, ids, mask, max_new_tokens=7)
  beams = beam_search(model, ids, mask, constraint=None, num_beams=1, num_return=1,
                      max_new_tokens=7, eos_token_id=EOS)
  np.testing.assert_array_equal(np.asarray(beams.tokens)[:, 0], np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(beams.scores)[:, 0],
                             np.asarray(greedy.logprobs).sum(-1), atol=1e-4)
  wide = beam_search(model, ids, mask, constraint=None, num_beams=4, num_return=2,
                     max_new_tokens=7, eos_token_id=EOS)
  scores = np.asarray(wide.scores)
  assert (scores[:, 0] >= scores[:, 1]).all() and np.isfinite(scores).all()


def test_constrained_beam_search_under_mesh_matches_single_device(tiny, tmp_path):
  import jax
  from recllm_jax import sharding
  hf, model = tiny
  hf.save_pretrained(tmp_path / "hf")
  trie = cons.ItemTrie(_catalog(2, n=20), VOCAB)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS)
  ids = np.array([[0, 11, 12, 13], [21, 22, 23, 24], [0, 0, 5, 6], [7, 8, 9, 10]])
  mask = (ids > 0).astype(int)
  kwargs = dict(constraint=constraint, num_beams=4, num_return=3, max_new_tokens=6)
  ref = beam_search(model, ids, mask, **kwargs)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_hf_model(tmp_path / "hf", mesh=mesh)
  with jax.set_mesh(mesh):
    out = beam_search(sharded, ids, mask, **kwargs)
  np.testing.assert_array_equal(sharding.host_array(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(sharding.host_array(out.scores), np.asarray(ref.scores), atol=1e-4)


def test_shared_prompt_prefix_matches_a_repeated_cache(tiny):
  """Beam search's cache (the prompt once per prompt as a `prefix`, W beams owning only their
  generated slots, reordered alone) gives the logits and positions of the plain cache holding W
  copies of the prompt and reordered whole, step after step."""
  import jax.numpy as jnp
  from recllm_jax.decoding import _gather_rows, _reorder_beams
  from recllm_jax.models.qwen2 import KVCache
  _, model = tiny
  w, m = 3, 4
  ids = jnp.asarray([[0, 0, 11, 12], [21, 22, 23, 24]])  # left-padded: positions differ by row
  mask = ids > 0
  _, full = model(ids, mask, cache=model.init_cache(2, 4 + m))
  full = full.repeat(w)  # [2*W, K, 4 + M, Dh]
  _, prompt = model(ids, mask, cache=model.init_cache(2, 4))  # [2, K, 4, Dh]
  shared = model.init_cache(2 * w, m, prefix=prompt)  # own slots [2*W, K, M, Dh]
  rng = np.random.default_rng(0)
  for _ in range(m):
    np.testing.assert_array_equal(shared.next_positions(), full.next_positions())
    tokens = jnp.asarray(rng.integers(3, VOCAB, (2 * w, 1)), jnp.int32)
    want, full = model(tokens, jnp.ones_like(tokens, bool), cache=full)  # [2*W, 1, V]
    got, shared = model(tokens, jnp.ones_like(tokens, bool), cache=shared)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # Each prompt's new beams descend from random beams of the same prompt (repeats included).
    rows = jnp.asarray((np.arange(2)[:, None] * w + rng.integers(0, w, (2, w))).reshape(-1))
    full, shared = _gather_rows(full, rows), _reorder_beams(shared, rows)
  with pytest.raises(ValueError, match="not a multiple"):
    KVCache.init(model.cfg, 5, m, prefix=prompt)


# -- CF-guided decoding (D3): a per-prompt log-prior over leaves mixed into the beam ------------


def _prompts() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  prompts = [np.array([11, 12, 13, 14, 15]), np.array([20, 21, 22])]
  ids, mask = np.zeros((2, 5), np.int64), np.zeros((2, 5), np.int64)
  for b, p in enumerate(prompts):
    ids[b, 5 - len(p):], mask[b, 5 - len(p):] = p, 1
  return prompts, ids, mask


def test_zero_prior_weight_is_the_plain_search(tiny):
  _, model = tiny
  trie = cons.ItemTrie(_catalog(1, n=30), VOCAB)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS)
  _, ids, mask = _prompts()
  prior = np.random.default_rng(0).normal(size=(2, trie.num_leaves)).astype(np.float32)
  prior[:, 3] = -np.inf  # a zero-mass leaf stays reachable when the prior is off
  kwargs = dict(constraint=constraint, num_beams=5, num_return=5, max_new_tokens=6)
  ref = beam_search(model, ids, mask, **kwargs)
  out = beam_search(model, ids, mask, prior=prior, prior_weight=0.0, **kwargs)
  for field in ("tokens", "lengths", "scores", "items"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)))


@pytest.mark.parametrize("weight", [0.7, 3.0])
def test_beam_as_wide_as_the_catalog_with_a_prior_is_exact_mixed_scoring(tiny, weight):
  hf, model = tiny
  seqs = _catalog()  # titles that are prefixes of titles: EOS there must add the own leaf only
  trie = cons.ItemTrie(seqs, VOCAB)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS)
  prompts, ids, mask = _prompts()
  rng = np.random.default_rng(1)
  prior = rng.normal(scale=2.0, size=(2, len(seqs))) + 5.0  # unnormalised on purpose
  k = 6
  out = beam_search(model, ids, mask, constraint=constraint, num_beams=len(seqs), num_return=k,
                    max_new_tokens=6, prior=prior, prior_weight=weight)
  tokens, scores, lengths = map(np.asarray, (out.tokens, out.scores, out.lengths))
  for b, p in enumerate(prompts):
    log_prior = prior[b] - np.log(np.exp(prior[b]).sum())  # sequences are sorted = leaf order
    exact = _brute_force(hf, p, seqs) + weight * log_prior
    best = np.argsort(-exact)[:k]
    got = [tuple(tokens[b, r, :lengths[b, r] - 1]) for r in range(k)]
    assert got == [seqs[i] for i in best]
    np.testing.assert_allclose(scores[b], exact[best], atol=1e-4)


def test_a_prior_on_one_item_with_a_large_weight_ranks_it_first(tiny):
  hf, model = tiny
  seqs = _catalog(1, n=30)
  trie = cons.ItemTrie(seqs, VOCAB)
  prompts, ids, mask = _prompts()
  # The model's least likely title for each prompt gets nearly all the prior mass.
  worst = [int(np.argmin(_brute_force(hf, p, seqs))) for p in prompts]
  prior = np.full((2, len(seqs)), -30.0)
  prior[[0, 1], worst] = 0.0
  out = beam_search(model, ids, mask, constraint=cons.CatalogConstraint(trie, eos_token_id=EOS),
                    num_beams=3, num_return=3, max_new_tokens=6, prior=prior, prior_weight=10.0)
  assert np.asarray(out.items)[:, 0].tolist() == worst
  plain = beam_search(model, ids, mask, constraint=cons.CatalogConstraint(trie, eos_token_id=EOS),
                      num_beams=3, num_return=3, max_new_tokens=6)
  assert not set(worst) & set(np.asarray(plain.items).ravel().tolist())


def test_zero_mass_items_are_unreachable_and_bad_priors_are_rejected(tiny):
  _, model = tiny
  seqs = [(5, 6), (5, 7), (8,)]
  trie = cons.ItemTrie(seqs, VOCAB)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS)
  ids, mask = np.array([[9, 10]]), np.ones((1, 2))
  kwargs = dict(constraint=constraint, num_beams=3, num_return=3, max_new_tokens=4)
  out = beam_search(model, ids, mask, prior=np.array([[0.0, -np.inf, 0.0]]), prior_weight=1.0,
                    **kwargs)
  assert sorted(np.asarray(out.items)[0, :2].tolist()) == [0, 2]
  assert np.asarray(out.scores)[0, 2] == -np.inf
  with pytest.raises(ValueError, match="num_leaves=3"):
    beam_search(model, ids, mask, prior=np.zeros((1, 2)), prior_weight=1.0, **kwargs)
  with pytest.raises(ValueError, match="at least one finite"):
    beam_search(model, ids, mask, prior=np.full((1, 3), -np.inf), prior_weight=1.0, **kwargs)
  with pytest.raises(ValueError, match="prior_weight"):
    beam_search(model, ids, mask, prior=np.zeros((1, 3)), prior_weight=-1.0, **kwargs)
