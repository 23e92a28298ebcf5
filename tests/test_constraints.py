"""Catalog trie + constrained decoding: structure, masks vs brute force, generate integration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recllm_jax import constraints as cons
from recllm_jax.decoding import generate
from recllm_jax.models.qwen2_hf import load_hf_model

EOS, DELIM, VOCAB = 2, 3, 16


def _catalog(seed: int = 0, n: int = 30) -> list[tuple[int, ...]]:
  """Short sequences over a tiny alphabet: many shared prefixes, titles that are prefixes of
  other titles, and duplicate titles."""
  rng = np.random.default_rng(seed)
  seqs = [tuple(int(t) for t in rng.integers(4, 9, size=rng.integers(1, 5))) for _ in range(n)]
  seqs += [seqs[0], seqs[5], seqs[7][:1], (4,), (4, 4), (4, 4, 4)]
  return seqs


def test_trie_structure_and_duplicates():
  seqs = _catalog()
  trie = cons.ItemTrie(seqs, VOCAB, max_sparse_degree=2)
  assert trie.num_leaves == len(set(seqs))
  for i, s in enumerate(seqs):
    leaf = trie.lookup(s)
    assert leaf >= 0 and trie.leaf_sequences[leaf] == s and i in trie.leaf_items(leaf)
  assert trie.leaf_items(trie.lookup(seqs[0])) == [0, len(seqs) - 6]  # duplicate -> one leaf
  assert trie.lookup((8, 8, 8, 8, 8, 8)) == -1
  for n in range(trie.num_nodes):
    kids = np.arange(trie.first_child[n], trie.first_child[n + 1])
    assert (np.diff(trie.token[kids]) > 0).all()
    prefix_leaves = set(range(trie.leaf_lo[n], trie.leaf_hi[n]))
    below = set(trie.leaf_lo[n:n + 1]) if trie.terminal[n] else set()
    for c in kids:
      below |= set(range(trie.leaf_lo[c], trie.leaf_hi[c]))
    assert below == prefix_leaves
  assert len(trie.dense_nodes) > 0  # the small max_sparse_degree exercises bit-packed rows


def test_from_titles_with_trained_tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  titles = ["Red Pen", "Red Pen Blue", "Blue Stapler", "Red Pen"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"[UNK]": 0, "Red": 1, "Pen": 2, "Blue": 3, "Stapler": 4}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trie = cons.ItemTrie.from_titles(titles, tok, vocab_size=8)
  assert trie.num_leaves == 3
  assert trie.leaf_items(trie.lookup([1, 2])) == [0, 3]
  assert trie.lookup([1, 2, 3]) >= 0


def test_end_token_inside_titles_is_rejected():
  trie = cons.ItemTrie([(5,), (5, DELIM, 6)], VOCAB)
  with pytest.raises(ValueError, match="end token"):
    cons.CatalogConstraint(trie, eos_token_id=EOS, num_items=2, delimiter=(DELIM,))
  cons.CatalogConstraint(trie, eos_token_id=EOS)  # one item: only EOS ends it, no clash


def _reference_allowed(seqs, prefix, banned, end_tok):
  """Brute force: next tokens that keep `prefix` on a path to a non-banned sequence."""
  live = [s for s in set(seqs) if s not in banned]
  allowed = {s[len(prefix)] for s in live if len(s) > len(prefix) and s[:len(prefix)] == prefix}
  if prefix in live:
    allowed.add(end_tok)
  return allowed


@pytest.mark.parametrize("num_items,delimiter,with_history", [
    (1, (), False), (3, (DELIM,), True), (4, (DELIM, 9), True)])
def test_masks_match_brute_force_on_random_walks(num_items, delimiter, with_history):
  seqs = _catalog(1)
  trie = cons.ItemTrie(seqs, VOCAB, max_sparse_degree=2)
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS, num_items=num_items,
                                      delimiter=delimiter)
  rows = 24
  rng = np.random.default_rng(num_items)
  history = np.full((rows, 5), -1, np.int64)
  if with_history:
    for r in range(rows):
      # Ban a whole family sometimes: every title starting with 4 (dead-end prefix) + random ones.
      fam = [i for i, s in enumerate(seqs) if s[0] == 4] if r % 3 == 0 else []
      picks = (fam + list(rng.choice(len(seqs), 5, replace=False)))[:5]
      history[r, :len(picks)] = picks
  arrays, spec = trie.device_arrays(), constraint.spec
  spec = cons.ConstraintSpec(spec.num_items, spec.delimiter, spec.eos_token_id, with_history)
  state = cons.init_state(arrays, spec, rows, jnp.asarray(history) if with_history else None)
  allowed_fn = jax.jit(lambda s: cons.allowed_tokens(arrays, spec, s))
  advance_fn = jax.jit(lambda s, t: cons.advance(arrays, spec, s, t))

  emitted = [[] for _ in range(rows)]
  prefix = [() for _ in range(rows)]
  delim_left = [0] * rows
  done = [False] * rows
  for _ in range(40):
    mask = np.asarray(allowed_fn(state))
    tokens = np.zeros(rows, np.int32)
    for r in range(rows):
      if done[r]:
        want = {EOS}
      elif delim_left[r]:
        want = {delimiter[len(delimiter) - delim_left[r]]}
      else:
        banned = {seqs[i] for i in history[r] if i >= 0} | set(emitted[r])
        end_tok = EOS if len(emitted[r]) + 1 == num_items else delimiter[0]
        want = _reference_allowed(seqs, prefix[r], banned, end_tok) or {EOS}
      assert set(np.flatnonzero(mask[r])) == want, (r, prefix[r], emitted[r])
      tokens[r] = rng.choice(sorted(want))
      # Reference state update.
      if done[r]:
        continue
      if delim_left[r]:
        delim_left[r] -= 1
      elif prefix[r] in set(seqs) and tokens[r] == (
          EOS if len(emitted[r]) + 1 == num_items else delimiter[0]):
        emitted[r].append(prefix[r])
        prefix[r] = ()
        delim_left[r] = len(delimiter) - 1 if len(emitted[r]) < num_items else 0
        done[r] = len(emitted[r]) == num_items
      else:
        prefix[r] = prefix[r] + (int(tokens[r]),)
    state = advance_fn(state, jnp.asarray(tokens))
  assert all(done), "every walk should complete within 40 steps"
  items = np.asarray(state.items)
  for r in range(rows):
    assert [trie.leaf_sequences[l] for l in items[r]] == emitted[r]
    assert len(set(emitted[r])) == num_items


def test_constrained_generate_emits_distinct_catalog_items(hf_checkpoint):
  path, _ = hf_checkpoint(vocab_size=VOCAB + 8)
  model = load_hf_model(path)
  seqs = _catalog(2, n=40)
  trie = cons.ItemTrie(seqs, VOCAB + 8)
  history = np.array([[0, 1, 2, -1], [5, -1, -1, -1]])
  constraint = cons.CatalogConstraint(trie, eos_token_id=EOS, num_items=3, delimiter=(DELIM,),
                                      history=history)
  ids = np.array([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]])
  mask = (ids > 0).astype(np.int64)
  for temperature in (0.0, 1.0):
    out = generate(model, ids, mask, max_new_tokens=24, constraint=constraint,
                   temperature=temperature, rng=jax.random.key(1), num_samples=4, pad_token_id=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(8):
      seq = tokens[row, :lengths[row]].tolist()
      assert seq[-1] == EOS, seq
      parts, cur = [], []
      for t in seq[:-1] + [DELIM]:
        if t == DELIM:
          parts.append(tuple(cur))
          cur = []
        else:
          cur.append(t)
      assert len(parts) == 3 and len(set(parts)) == 3
      banned = {seqs[i] for i in history[row // 4] if i >= 0}
      assert all(trie.lookup(p) >= 0 and p not in banned for p in parts)
      assert [trie.leaf_sequences[l] for l in np.asarray(out.items)[row]] == parts
      assert np.isfinite(np.asarray(out.logprobs)[row, :lengths[row]]).all()
    item_ids = constraint.items(out.items)
    assert all(len(ids_) >= 1 for row in item_ids for ids_ in row)


def test_prefix_whose_items_are_all_banned_is_masked():
  # Titles (4, 5) and (4, 6, 7) are in the history: the prefix 4 leads nowhere and must be masked,
  # while (4, 6) itself stays reachable only as a complete title.
  trie = cons.ItemTrie([(4, 5), (4, 6, 7), (8,), (4, 6)], VOCAB, max_sparse_degree=1)
  spec = cons.ConstraintSpec(1, (), EOS, True)
  arrays = trie.device_arrays()
  state = cons.init_state(arrays, spec, 2, jnp.asarray([[0, 1, 3], [0, 1, -1]]))
  mask = np.asarray(cons.allowed_tokens(arrays, spec, state))
  assert set(np.flatnonzero(mask[0])) == {8}
  assert set(np.flatnonzero(mask[1])) == {4, 8}
  state = cons.advance(arrays, spec, state, jnp.asarray([8, 4]))
  state = cons.advance(arrays, spec, state, jnp.asarray([EOS, 6]))
  mask = np.asarray(cons.allowed_tokens(arrays, spec, state))
  assert set(np.flatnonzero(mask[1])) == {EOS}  # (4, 6) complete; (4, 6, 7) banned
  assert np.asarray(state.items)[0, 0] == trie.lookup((8,))


def test_prior_pairs_list_exactly_the_leaves_below_each_node():
  seqs = _catalog(3) + [(4,), (4, 5), (4, 5, 6)]
  trie = cons.ItemTrie(seqs, 16)
  pairs = trie.prior_arrays()
  got = {(int(n), int(l)) for n, l in zip(np.asarray(pairs.pair_node), np.asarray(pairs.pair_leaf))}
  # Brute force: node n's prefix is the token path to it; leaf l is below n iff it starts with it.
  prefix = {0: ()}
  for n in range(trie.num_nodes):
    for c in range(trie.first_child[n], trie.first_child[n + 1]):
      prefix[c] = prefix[n] + (int(trie.token[c]),)
  want = {(n, l) for n, p in prefix.items() for l, s in enumerate(trie.leaf_sequences)
          if s[:len(p)] == p}
  assert got == want
  assert pairs.max_degree == int(np.diff(trie.first_child).max())


def test_leaf_log_prior_adds_the_masses_of_items_sharing_a_title():
  trie = cons.ItemTrie([(5, 6), (7,), (5, 6), (8,)], 16)  # items 0 and 2 share leaf 0
  with np.errstate(divide="ignore"):
    item_logp = np.log([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
  got = trie.leaf_log_prior(item_logp)
  np.testing.assert_allclose(np.exp(got), [[0.4, 0.2, 0.4], [0.5, 0.5, 0.0]], rtol=1e-6)
  assert got[1, 2] == -np.inf and got.dtype == np.float32
  tiny = trie.leaf_log_prior(np.array([[-200.0, -1.0, -201.0, -np.inf]]))
  np.testing.assert_allclose(tiny[0, 0], np.logaddexp(-200.0, -201.0), rtol=1e-6)
  with pytest.raises(ValueError, match="num_items=4"):
    trie.leaf_log_prior(np.zeros((1, 3)))
