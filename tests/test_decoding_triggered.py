"""Triggered catalog constraint (`generate(constraint_trigger=..., constraint_close=...)`).

The `cot_constrained` rollout: free text until the trigger (e.g. "<answer>\\n"), then K distinct
catalog titles, the close sequence (e.g. "\\n</answer>") and EOS, all inside one jitted loop.
Checked against a host reference of the list grammar and exact (torch) log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from recllm_jax import constraints as cons
from recllm_jax import sharding
from recllm_jax.decoding import generate
from recllm_jax.models.qwen2_hf import load_hf_model

EOS, DELIM, VOCAB = 2, 3, 24
CLOSE = (13, 14)
TITLES = [(4,), (4, 5), (4, 5, 6), (5, 7), (6,), (6, 8, 9), (7, 7), (8, 4, 5), (9,), (9, 6, 4, 4)]


def _constraint(num_items: int = 2, history=None) -> cons.CatalogConstraint:
  return cons.CatalogConstraint(cons.ItemTrie(TITLES, VOCAB), eos_token_id=EOS,
                                num_items=num_items, delimiter=(DELIM,), history=history)


def _trigger_end(tokens, trigger) -> int | None:
  """Index just after the first occurrence of `trigger` in `tokens` (naive search), or None."""
  n = len(trigger)
  for i in range(n, len(tokens) + 1):
    if tuple(tokens[i - n:i]) == tuple(trigger):
      return i
  return None


def _reference_list(tokens, num_items: int, banned_titles) -> tuple[list[set[int]], list[tuple]]:
  """Walks the tokens after the trigger through the list grammar: the allowed set before each
  token (asserting the token is in it) and the completed titles."""
  allowed_sets, titles, prefix, closing = [], [], (), None
  for t in tokens:
    if closing is not None:
      want = {(CLOSE + (EOS,))[closing]}
      closing += 1
    else:
      end = DELIM if len(titles) + 1 < num_items else CLOSE[0]
      live = [s for s in set(TITLES) if s not in banned_titles and s not in titles]
      want = {s[len(prefix)] for s in live if len(s) > len(prefix) and s[:len(prefix)] == prefix}
      if prefix in live:
        want.add(end)
      want = want or {CLOSE[0]}  # nothing usable is left: the list ends
      if t == end and prefix in live:
        titles.append(prefix)
        prefix = ()
        closing = 1 if len(titles) == num_items else None
      elif t == CLOSE[0] and not (want - {CLOSE[0]}):
        closing = 1
      else:
        prefix = prefix + (int(t),)
    assert t in want, (tokens, t, want)
    allowed_sets.append(want)
  return allowed_sets, titles


@pytest.fixture(scope="module")
def flat(tmp_path_factory, build_hf_model):
  """A tiny random model with flattened logits, so that every token is sampled now and then."""
  hf = build_hf_model(5, vocab_size=VOCAB)
  with torch.no_grad():
    hf.lm_head.weight.mul_(0.05)
  path = tmp_path_factory.mktemp("trig") / "hf"
  hf.save_pretrained(path)
  return path, hf, load_hf_model(path)


def _prompts(batch: int, length: int = 5, seed: int = 0):
  ids = np.random.default_rng(seed).integers(4, VOCAB, size=(batch, length))
  return ids, np.ones_like(ids)


def test_trigger_matching_is_kmp_exact():
  """Overlapping multi-token triggers switch on exactly where the naive search finds them."""
  constraint = _constraint(1)
  arrays, spec = constraint.trie.device_arrays(), constraint.spec
  rng = np.random.default_rng(0)
  for trigger in [(10, 11, 10, 12), (10, 10, 11), (10,), (11, 10, 11, 10)]:
    tspec = cons.TriggerSpec(trigger, CLOSE)
    step = jax.jit(lambda s, t, tspec=tspec: cons.trigger_advance(arrays, spec, tspec, s, t))
    streams = rng.choice([10, 11, 12], size=(64, 20))
    streams[0, :6] = [10, 11, 10, 11, 10, 12]  # needs the border fallback 3 -> 1
    streams[1, :4] = [10, 10, 10, 11]
    state = cons.trigger_init(arrays, spec, tspec, 64)
    for i in range(20):
      state = step(state, jnp.asarray(streams[:, i], jnp.int32))
      phase = np.asarray(state.phase)
      for r in range(64):
        end = _trigger_end(streams[r, :i + 1], trigger)
        # Once triggered, rows leave FREE for good (and the list machine takes the tokens).
        assert (phase[r] != cons.FREE) == (end is not None), (trigger, streams[r, :i + 1])
  assert _trigger_end([10, 11, 10, 11, 10, 12], (10, 11, 10, 12)) == 6


@pytest.mark.parametrize("skip_idle", [True, False])
def test_masks_through_trigger_list_and_close(skip_idle):
  """Hand-checked masks: free (all), list (trie), forced close then EOS; a row whose history
  bans every title closes the list at once. Same with and without skipping idle trie work."""
  history = np.array([[3, -1] + [-1] * 8, list(range(10))])  # row 1: everything banned
  constraint = _constraint(1, history)
  arrays, spec = constraint.trie.device_arrays(), constraint.spec
  tspec = cons.TriggerSpec((10,), CLOSE)
  state = cons.trigger_init(arrays, spec, tspec, 2, jnp.asarray(history))
  allowed = jax.jit(lambda s: cons.trigger_allowed(arrays, spec, tspec, s, skip_idle=skip_idle))
  advance = jax.jit(lambda s, t: cons.trigger_advance(arrays, spec, tspec, s, t,
                                                      skip_idle=skip_idle))
  everything = set(range(VOCAB))
  walk = [  # (allowed set per row, tokens fed)
      ((everything, everything), (7, 7)),
      ((everything, everything), (10, 10)),  # the trigger: the list starts with the next token
      (({4, 6, 7, 8, 9}, {CLOSE[0]}), (4, CLOSE[0])),  # (5, 7) banned; row 1 has nothing left
      (({5, CLOSE[0]}, {CLOSE[1]}), (5, CLOSE[1])),  # (4,) is complete: close[0] may end it
      (({6, CLOSE[0]}, {EOS}), (CLOSE[0], EOS)),
      (({CLOSE[1]}, None), (CLOSE[1], EOS)),
      (({EOS}, None), (EOS, EOS)),
  ]
  for want, tokens in walk:
    mask = np.asarray(allowed(state))
    for r in range(2):
      if want[r] is not None:
        assert set(np.flatnonzero(mask[r])) == want[r], (tokens, r)
    state = advance(state, jnp.asarray(tokens, jnp.int32))
  assert np.asarray(state.inner.items)[:, 0].tolist() == [constraint.trie.lookup((4, 5)), -1]
  assert np.asarray(state.phase).tolist() == [cons.CLOSE, cons.CLOSE]


@pytest.mark.parametrize("trigger,groups", [((10,), 48), ((10, 11), 256)])
def test_sampled_rows_follow_the_grammar_after_the_trigger(flat, trigger, groups):
  _, hf, model = flat
  ids, mask = _prompts(2)
  history = np.array([[0, 6, -1], [2, -1, -1]])
  constraint = _constraint(2, history)
  m, temperature = 40, 1.0
  kwargs = dict(max_new_tokens=m, rng=jax.random.key(7), temperature=temperature,
                num_samples=groups, eos_token_id=EOS)
  out = generate(model, ids, mask, constraint=constraint, constraint_trigger=trigger,
                 constraint_close=CLOSE, **kwargs)
  ref = generate(model, ids, mask, **kwargs)  # same rng, no constraint
  tokens, lengths, logprobs = (np.asarray(x) for x in (out.tokens, out.lengths, out.logprobs))
  constrained, items = np.asarray(out.constrained), np.asarray(out.items)
  ref_tokens, ref_logprobs = np.asarray(ref.tokens), np.asarray(ref.logprobs)
  finished = 0
  allowed_per_row = {}
  for r in range(len(tokens)):
    seq = tokens[r, :lengths[r]].tolist()
    start = _trigger_end(seq, trigger)
    if start is None:
      # Never triggered: exactly the unconstrained sample (same per-step draws).
      np.testing.assert_array_equal(tokens[r], ref_tokens[r])
      np.testing.assert_array_equal(logprobs[r], ref_logprobs[r])
      assert not constrained[r].any() and (items[r] == -1).all()
      continue
    # Free text up to the trigger is the unconstrained sample too.
    np.testing.assert_array_equal(tokens[r, :start], ref_tokens[r, :start])
    np.testing.assert_array_equal(logprobs[r, :start], ref_logprobs[r, :start])
    banned = {TITLES[i] for i in history[r // groups] if i >= 0}
    allowed_sets, titles = _reference_list(seq[start:], 2, banned)
    assert constrained[r].tolist() == [start <= t < lengths[r] for t in range(m)]
    want_items = [constraint.trie.lookup(t) for t in titles] + [-1] * (2 - len(titles))
    assert items[r].tolist() == want_items
    if seq[-1] == EOS:
      finished += 1
      assert len(titles) == 2 and len(set(titles)) == 2
      assert tuple(seq[-3:]) == CLOSE + (EOS,)
      np.testing.assert_array_equal(logprobs[r, lengths[r] - 2:lengths[r]], 0.0)  # forced
    else:
      assert lengths[r] == m  # cut by max_new_tokens inside the list
    allowed_per_row[r] = (start, allowed_sets)
  print(f"{len(allowed_per_row)} of {len(tokens)} rows triggered, {finished} closed the list")
  assert finished >= 8 and len(allowed_per_row) < len(tokens)  # both kinds of rows occur
  # Log-probs are those of the distribution sampled from: full softmax(logits / T) in the free
  # text, renormalised over the trie's allowed set after the trigger.
  for r in list(allowed_per_row)[:6]:
    start, allowed_sets = allowed_per_row[r]
    full = np.concatenate([ids[r // groups], tokens[r, :lengths[r]]])
    with torch.no_grad():
      logits = hf(torch.tensor(full[None])).logits[0, ids.shape[1] - 1:-1].double().numpy()
    logits = logits / temperature  # [len, V]
    for t in range(lengths[r]):
      keep = np.ones(VOCAB, bool) if t < start else np.isin(np.arange(VOCAB),
                                                            list(allowed_sets[t - start]))
      z = np.where(keep, logits[t], -np.inf)
      want = z[tokens[r, t]] - z.max() - np.log(np.exp(z - z.max()).sum())
      np.testing.assert_allclose(logprobs[r, t], want, atol=2e-5, err_msg=f"row {r} step {t}")


def test_no_trigger_keeps_plain_constrained_decoding(flat):
  """Without a trigger the constraint applies from the first token and every token is
  `constrained`; without a constraint the mask is None."""
  _, _, model = flat
  ids, mask = _prompts(1)
  out = generate(model, ids, mask, max_new_tokens=14, constraint=_constraint(2), num_samples=4,
                 temperature=1.0, rng=jax.random.key(0))
  lengths = np.asarray(out.lengths)
  assert (np.asarray(out.constrained) == (np.arange(14) < lengths[:, None])).all()
  assert (np.asarray(out.items) >= 0).all()
  assert generate(model, ids, mask, max_new_tokens=2).constrained is None


def test_argument_errors(flat):
  _, _, model = flat
  ids, mask = _prompts(1)
  with pytest.raises(ValueError, match="needs a constraint"):
    generate(model, ids, mask, max_new_tokens=2, constraint_trigger=(10,))
  with pytest.raises(ValueError, match="only used with a constraint_trigger"):
    generate(model, ids, mask, max_new_tokens=2, constraint=_constraint(), constraint_close=CLOSE)
  with pytest.raises(ValueError, match="EOS"):
    generate(model, ids, mask, max_new_tokens=2, constraint=_constraint(),
             constraint_trigger=(10,), constraint_close=(13, EOS))
  with pytest.raises(ValueError, match="EOS id"):
    generate(model, ids, mask, max_new_tokens=2, constraint=_constraint(), eos_token_id=[14],
             constraint_trigger=(10,), constraint_close=CLOSE)
  with pytest.raises(ValueError, match="end token"):  # 5 continues the complete title (4,)
    generate(model, ids, mask, max_new_tokens=2, constraint=_constraint(),
             constraint_trigger=(10,), constraint_close=(5,))
  with pytest.raises(ValueError, match="non-empty"):
    generate(model, ids, mask, max_new_tokens=2, constraint=_constraint(), constraint_trigger=())


def test_sharded_mesh_matches_single_device(tmp_path, build_hf_model):
  hf = build_hf_model(6, vocab_size=VOCAB)
  hf.save_pretrained(tmp_path / "hf")
  model = load_hf_model(tmp_path / "hf")
  ids, mask = _prompts(4, seed=1)
  free = np.asarray(generate(model, ids, mask, max_new_tokens=6).tokens)
  # A two-token trigger that greedy row 0 produces at steps 2-3 (matched across loop steps).
  trigger = (int(free[0, 2]), int(free[0, 3]))
  kwargs = dict(max_new_tokens=20, constraint=_constraint(2), constraint_trigger=trigger,
                constraint_close=CLOSE, num_samples=2, eos_token_id=EOS)
  ref = generate(model, ids, mask, **kwargs)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_hf_model(tmp_path / "hf", mesh=mesh)
  with jax.set_mesh(mesh):
    out = generate(sharded, ids, mask, **kwargs)
  tokens = sharding.host_array(out.tokens)
  np.testing.assert_array_equal(tokens, np.asarray(ref.tokens))
  np.testing.assert_array_equal(sharding.host_array(out.constrained), np.asarray(ref.constrained))
  assert len(out.tokens.sharding.device_set) == 8
  seq = tokens[0, :int(np.asarray(ref.lengths)[0])].tolist()
  assert _trigger_end(seq, trigger) == 4 and tuple(seq[-3:]) == CLOSE + (EOS,)
  _reference_list(seq[4:], 2, set())
