"""Jitted autoregressive decoding for Qwen2: sampling (SFT eval, GRPO rollouts) and beam search.

Both decoders share one structure: a bucketed prefill of the (left-padded) prompts into a
fixed-size `KVCache`, then a `lax.while_loop` of single-token steps with no host syncs, stopping
early once every row is done. Everything runs as ONE jitted program per static configuration
(model graph, batch, prompt bucket, max_new_tokens, sampling settings, constraint spec), so
a training run compiles a handful of programs; `compile_count()` reports how many traces
happened (the test suite uses it to check bucket reuse).

Shape letters: B prompts, G samples per prompt, N = B*G rows, T prompt bucket, S cache slots,
V vocabulary, W beams, R returned sequences, M max_new_tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recllm_jax import buckets
from recllm_jax import constraints as cons
from recllm_jax.models.qwen2 import KVCache, Qwen2ForCausalLM
from recllm_jax.sharding import shard

__all__ = ["GenerateOutput", "BeamSearchOutput", "generate", "beam_search", "bucket_length",
           "compile_count", "sampling_logprobs", "sample_categorical"]

_NEG_INF = -jnp.inf
_TRACES = {"count": 0}


def compile_count() -> int:
  """Number of decoder programs traced (= compiled) so far in this process."""
  return _TRACES["count"]


def bucket_length(n: int, minimum: int = 64) -> int:
  """Prompt-length bucket (`buckets.geometric_bucket`): powers of two from `minimum` up to 1024,
  then multiples of 512.

  Prompts are left-padded to their bucket so that e.g. all prompts of 65..128 tokens share one
  compiled program; padding costs at most 2x prefill work, and prefill is cheap next to decode.
  """
  return buckets.geometric_bucket(n, minimum)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GenerateOutput:
  """Result of `generate`; rows are `b * num_samples + g`.

  tokens: [N, M] int32 generated tokens, `pad_token_id` after the first EOS (EOS kept).
  lengths: [N] int32 generated tokens per row including the EOS.
  logprobs: [N, M] fp32 log-prob of each token under the distribution it was drawn from
    (temperature, top-k, top-p and constraint applied, renormalised); for greedy decoding the
    model's own log-softmax. 0 at padding.
  items: [N, K] int32 trie leaf ids of the decoded items (constrained decoding), -1 if the row
    ended before completing item k (or never reached its trigger); None without a constraint.
    Map with `CatalogConstraint.items`.
  constrained: [N, M] bool, True where the token was drawn under the constraint's mask (trie
    tokens, delimiters, the forced close sequence and EOS); with a trigger, False for the free
    text up to and including the trigger. False at padding; None without a constraint.
  """

  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  items: jax.Array | None = None
  constrained: jax.Array | None = None


@flax.struct.dataclass
class BeamSearchOutput:
  """Result of `beam_search`, best first.

  tokens: [B, R, M] int32 sequences (pad after EOS). lengths: [B, R] including the EOS.
  scores: [B, R] fp32 sum of token log-probs (model log-softmax, EOS included), plus
    `prior_weight * log p_prior(item)` with a prior; -inf where fewer than R valid sequences
    exist. Ranking uses scores / lengths**length_penalty.
  items: [B, R] int32 trie leaf id of each sequence (constrained), else None.
  steps: [] int32 decode steps actually run (early stop once no live beam can improve).
  """

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  items: jax.Array | None = None
  steps: jax.Array | None = None


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def sampling_logprobs(logits: jax.Array, *, temperature: float, top_k: int = 0,
                      top_p: float = 1.0, allowed: jax.Array | None = None) -> jax.Array:
  """[N, V] logits -> [N, V] log-probs of the distribution to sample from (-inf = excluded).

  Order as in `transformers`: constraint mask, temperature, top-k (ties kept), top-p (smallest
  prefix of the sorted distribution whose mass reaches top_p, always at least one token).
  """
  logits = logits.astype(jnp.float32)
  if allowed is not None:
    logits = jnp.where(allowed, logits, _NEG_INF)
  logits = logits / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    top = jax.lax.top_k(logits, top_k)[0]  # [N, k] descending
    logits = jnp.where(logits < top[:, -1:], _NEG_INF, logits)
  else:
    top = None
  if top_p < 1.0:
    ranked = top if top is not None else -jnp.sort(-logits, axis=-1)  # [N, k or V] descending
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # [N, 1]
    logits = jnp.where(logits < threshold, _NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def sample_categorical(key: jax.Array, logp: jax.Array) -> jax.Array:
  """One draw per row from log-probs [N, V] by inverting the CDF with a single uniform per row.

  `jax.random.categorical` (Gumbel-max) needs N*V random numbers per step, which on CPU costs
  more than the rest of the sampling; inverse-CDF needs N. Tokens with zero probability are
  never returned (their CDF step is empty; the argmax fallback covers fp32 round-off at the top).
  """
  cdf = jnp.cumsum(jnp.exp(logp), axis=-1)  # [N, V]
  u = jax.random.uniform(key, (logp.shape[0], 1), jnp.float32) * cdf[:, -1:]  # [N, 1]
  token = jnp.minimum(jnp.sum(cdf <= u, axis=-1), logp.shape[-1] - 1).astype(jnp.int32)  # [N]
  ok = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0] > _NEG_INF
  return jnp.where(ok, token, jnp.argmax(logp, axis=-1).astype(jnp.int32))


def _left_align(input_ids: Any, attention_mask: Any, bucket: int, pad_id: int):
  """Host: moves each row's real tokens to the right end of a [B, bucket] array."""
  ids = np.asarray(jax.device_get(input_ids))
  mask = np.asarray(jax.device_get(attention_mask)).astype(bool)
  batch, length = ids.shape
  out_ids = np.full((batch, bucket), pad_id, np.int32)
  out_mask = np.zeros((batch, bucket), bool)
  for b in range(batch):
    real = ids[b][mask[b]]
    if real.size:
      out_ids[b, bucket - real.size:] = real
      out_mask[b, bucket - real.size:] = True
  return out_ids, out_mask


def _prefill(model: Qwen2ForCausalLM, ids: jax.Array, mask: jax.Array, cache_len: int,
             repeats: int) -> tuple[jax.Array, KVCache]:
  """Runs the prompts [B, T] once, for B*repeats rows of `cache_len` slots in all.

  With repeats > 1 (a GRPO group) the prompts' cache becomes the read-only shared prefix of the
  `repeats` consecutive rows of each prompt, and each row owns only its `cache_len - T` new
  slots: decoding reads a prompt's keys and values once per group instead of once per row.
  """
  batch, length = ids.shape
  ids = shard(ids, ("batch", None))
  mask = shard(mask, ("batch", None))
  cache = model.init_cache(batch, length if repeats > 1 else cache_len)
  hidden, cache = model(ids, mask, cache=cache, return_hidden=True)
  # Prompts are left-padded so the last slot is real; only it needs the LM head.
  logits = model.project_logits(hidden[:, -1:])[:, 0]  # [B, V]
  if repeats > 1:
    cache = model.init_cache(batch * repeats, cache_len - length, prefix=cache)
    logits = jnp.repeat(logits, repeats, axis=0)  # [B*repeats, V]
  return shard(logits, ("batch", None)), cache.constrain()


def _decode_step(model: Qwen2ForCausalLM, token: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
  """token [N] -> next logits [N, V] and the cache with one more slot."""
  logits, cache = model(token[:, None], jnp.ones_like(token, bool)[:, None], cache=cache)
  return logits[:, 0], cache


def _is_eos(token: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  if not eos_ids:
    return jnp.zeros(token.shape, bool)
  return jnp.any(token[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def _eos_tuple(eos_token_id: int | Sequence[int] | None, constraint: Any) -> tuple[int, ...]:
  if eos_token_id is None:
    eos = ()
  elif isinstance(eos_token_id, (int, np.integer)):
    eos = (int(eos_token_id),)
  else:
    eos = tuple(int(e) for e in eos_token_id)
  if constraint is not None and constraint.eos_token_id not in eos:
    eos = eos + (int(constraint.eos_token_id),)  # the constraint's last item ends there
  return eos


def _constraint_args(constraint: cons.CatalogConstraint | None, batch: int):
  if constraint is None:
    return None, None, None
  history = None
  if constraint.history is not None:
    history = jnp.asarray(constraint.history, jnp.int32)
    if history.ndim != 2 or history.shape[0] != batch:
      raise ValueError(f"constraint history must be [B={batch}, H], got {history.shape}")
  return constraint.trie.device_arrays(), constraint.spec, history


def _trigger_spec(constraint: cons.CatalogConstraint | None, trigger: Sequence[int] | None,
                  close: Sequence[int], eos_ids: tuple[int, ...]) -> cons.TriggerSpec | None:
  close = tuple(int(t) for t in close)
  if set(close) & set(eos_ids):
    raise ValueError(f"constraint_close {list(close)} contains an EOS id of {list(eos_ids)}: the "
                     "row would stop inside the close sequence")
  if trigger is None:
    if close:
      raise ValueError("constraint_close is only used with a constraint_trigger")
    return None
  if constraint is None:
    raise ValueError("constraint_trigger needs a constraint (a CatalogConstraint)")
  tspec = cons.TriggerSpec(tuple(int(t) for t in trigger), close)
  cons.check_trigger(constraint, tspec)
  return tspec


# ----------------------------------------------------------------------------------------------
# Sampling / greedy
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _Carry:
  step: jax.Array  # [] int32
  logits: jax.Array  # [N, V] fp32 logits for the token at `step`
  cache: KVCache
  done: jax.Array  # [N] bool
  tokens: jax.Array  # [N, M] int32
  logprobs: jax.Array  # [N, M] fp32
  cstate: Any  # ConstraintState (TriggerState with a trigger) | None
  constrained: Any  # [N, M] bool | None
  rng: jax.Array


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "cache_len", "num_samples", "temperature", "top_k", "top_p",
    "eos_ids", "pad_id", "spec", "tspec"))
def _generate_jit(graphdef, state, ids, mask, rng, trie, history, *, max_new_tokens, cache_len,
                  num_samples, temperature, top_k, top_p, eos_ids, pad_id, spec, tspec):
  _TRACES["count"] += 1
  model = nnx.merge(graphdef, state)
  logits, cache = _prefill(model, ids, mask, cache_len, num_samples)
  rows = logits.shape[0]
  cstate = constrained = None
  if spec is not None:
    if history is not None:
      history = jnp.repeat(history, num_samples, axis=0)
    if tspec is None:
      cstate = cons.init_state(trie, spec, rows, history)
    else:
      cstate = cons.trigger_init(trie, spec, tspec, rows, history)
    constrained = jnp.zeros((rows, max_new_tokens), bool)

  def select(c: _Carry) -> _Carry:
    """Picks the token at `step` for every row from `c.logits` and records it."""
    allowed = active = None
    if spec is not None and tspec is None:
      allowed = cons.allowed_tokens(trie, spec, c.cstate)  # [N, V]
      active = ~c.done
    elif spec is not None:
      allowed = cons.trigger_allowed(trie, spec, tspec, c.cstate)  # [N, V], free rows all True
      active = cons.trigger_active(c.cstate) & ~c.done
    if temperature == 0.0:
      masked = c.logits if allowed is None else jnp.where(allowed, c.logits, _NEG_INF)
      token = jnp.argmax(masked, axis=-1).astype(jnp.int32)
      logp = jax.nn.log_softmax(c.logits, axis=-1)  # the model's own distribution
    else:
      logp = sampling_logprobs(c.logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               allowed=allowed)
      token = sample_categorical(jax.random.fold_in(c.rng, c.step), logp)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]  # [N]
    token = jnp.where(c.done, pad_id, token)
    token_logp = jnp.where(c.done, 0.0, token_logp)
    cstate, constrained = c.cstate, c.constrained
    if spec is not None:
      if tspec is None:
        new = cons.advance(trie, spec, cstate, token)
      else:
        new = cons.trigger_advance(trie, spec, tspec, cstate, token)
      cstate = jax.tree.map(lambda a, b: jnp.where(
          c.done.reshape(c.done.shape + (1,) * (a.ndim - 1)), a, b), cstate, new)
      constrained = constrained.at[:, c.step].set(active)
    return c.replace(
        tokens=c.tokens.at[:, c.step].set(token), logprobs=c.logprobs.at[:, c.step].set(token_logp),
        done=c.done | _is_eos(token, eos_ids), cstate=cstate, constrained=constrained)

  def body(c: _Carry) -> _Carry:
    c = select(c)
    token = c.tokens[:, c.step]
    logits, cache = _decode_step(model, token, c.cache)
    return c.replace(step=c.step + 1, logits=logits, cache=cache.constrain())

  def cond(c: _Carry) -> jax.Array:
    return (c.step < max_new_tokens - 1) & ~jnp.all(c.done)

  carry = _Carry(step=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
                 done=jnp.zeros((rows,), bool),
                 tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
                 logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32), cstate=cstate,
                 constrained=constrained, rng=rng)
  carry = jax.lax.while_loop(cond, body, carry)
  carry = select(carry)  # the last token needs no forward pass
  eos = _is_eos(carry.tokens, eos_ids)  # [N, M]
  before_first_eos = jnp.cumsum(eos, axis=-1) - eos == 0  # EOS itself counts (pad may equal EOS)
  lengths = jnp.sum(before_first_eos & (jnp.arange(max_new_tokens) <= carry.step), axis=-1)
  items = None
  if spec is not None:
    items = (carry.cstate if tspec is None else carry.cstate.inner).items
  return GenerateOutput(tokens=carry.tokens, lengths=lengths.astype(jnp.int32),
                        logprobs=carry.logprobs, items=items, constrained=carry.constrained)


def generate(model: Qwen2ForCausalLM, input_ids: Any, attention_mask: Any, *,
             max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0, constraint: cons.CatalogConstraint | None = None,
             num_samples: int = 1, constraint_trigger: Sequence[int] | None = None,
             constraint_close: Sequence[int] = ()) -> GenerateOutput:
  """Decodes up to `max_new_tokens` tokens for each prompt, `num_samples` times.

  Args:
    model: the causal LM (any sharding; run under `jax.set_mesh(mesh)` to shard the batch over
      ("data", "fsdp")).
    input_ids, attention_mask: [B, T] prompts; any padding side (rows are re-aligned left-padded
      into a `bucket_length(T)` bucket on the host).
    max_new_tokens: decode steps (static: part of the compiled program).
    rng: PRNG key for sampling (required when temperature > 0).
    temperature: 0 = greedy (argmax); otherwise sampling with temperature / top_k / top_p.
    eos_token_id: int or list of ints; a row stops after emitting one. The constraint's EOS is
      always added.
    pad_token_id: fills prompt padding and the tokens after EOS.
    constraint: optional `CatalogConstraint`: only catalog items (or lists of them) are decoded,
      from the first generated token unless `constraint_trigger` is given.
    num_samples: G samples per prompt (a GRPO group); prompts are prefilled once and the cache is
      repeated, output row b*G + g is sample g of prompt b.
    constraint_trigger: token ids (e.g. of "<answer>\n") that switch `constraint` on: each row
      decodes freely (and may stop at EOS) until its generated tokens end with this sequence;
      from the next token on it emits the constraint's K distinct items, then
      `constraint_close`, then the constraint's EOS. Rows that never produce it stay free.
    constraint_close: token ids (e.g. of "\n</answer>") forced after the K-th item when a
      trigger is given; its first token ends the K-th item in place of EOS, so it must not
      continue a title where another title ends. Empty: the K-th item ends with EOS as usual.

  Returns:
    `GenerateOutput` with [B*G, max_new_tokens] tokens and log-probs (and, with a constraint,
    the items and the per-token `constrained` mask).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  eos_ids = _eos_tuple(eos_token_id, constraint)
  tspec = _trigger_spec(constraint, constraint_trigger, constraint_close, eos_ids)
  batch, length = np.shape(input_ids)
  bucket = bucket_length(length)
  ids, mask = _left_align(input_ids, attention_mask, bucket, pad_token_id)
  trie, spec, history = _constraint_args(constraint, batch)
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate_jit(
      graphdef, state, jnp.asarray(ids), jnp.asarray(mask), rng, trie, history,
      max_new_tokens=int(max_new_tokens), cache_len=bucket + int(max_new_tokens),
      num_samples=int(num_samples), temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), eos_ids=eos_ids, pad_id=int(pad_token_id), spec=spec, tspec=tspec)


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _BeamCarry:
  step: jax.Array  # [] int32
  logits: jax.Array  # [B*W, V]
  cache: KVCache
  alive_scores: jax.Array  # [B, W] sum log-probs of live beams (-inf = dead)
  alive_tokens: jax.Array  # [B, W, M]
  cstate: Any  # ConstraintState over B*W rows | None
  done_scores: jax.Array  # [B, R] ranking score of finished hypotheses
  done_sums: jax.Array  # [B, R] their sum of log-probs
  done_tokens: jax.Array  # [B, R, M]
  done_lengths: jax.Array  # [B, R]
  done_items: jax.Array  # [B, R]


def _gather_rows(tree: Any, index: jax.Array) -> Any:
  """Gathers the leading (row) axis of every array in `tree` with `index` [N]."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, index, axis=0), tree)


def _reorder_beams(cache: KVCache, rows: jax.Array) -> KVCache:
  """Row i of the new cache is beam `rows[i]`'s: only the generated slots [B*W, K, M, Dh] move.

  The prompt lives once per prompt in `cache.prefix`, which a beam's parent (always a beam of
  the same prompt) shares, so each step copies O(B*W*M) slots instead of the prompt's
  O(B*W*(T + M)), and the prompt's keys/values are stored (and read by attention) once, not W
  times.
  """
  k, v, mask = _gather_rows((cache.k, cache.v, cache.mask), rows)
  return cache.replace(k=k, v=v, mask=mask)


def _penalised(scores: jax.Array, lengths: jax.Array, length_penalty: float) -> jax.Array:
  if length_penalty == 0.0:
    return scores
  return scores / jnp.asarray(lengths, jnp.float32) ** length_penalty


def _keep_best(scores, *fields, k: int):
  """Top-k along axis 1 of `scores` [B, C]; gathers every field [B, C, ...] alike."""
  best, idx = jax.lax.top_k(scores, k)
  return (best,) + tuple(jnp.take_along_axis(f, idx.reshape(idx.shape + (1,) * (f.ndim - 2)),
                                             axis=1) for f in fields)


def _prior_log_masses(parrays: cons.PriorArrays, prior: jax.Array,
                      num_nodes: int) -> tuple[jax.Array, jax.Array]:
  """[B, L] leaf log-priors -> log of the normalised mass below every node [B, N] and of every
  leaf [B, L] (the root's mass is 1)."""
  p = jax.nn.softmax(prior.astype(jnp.float32), axis=-1)  # [B, L]
  mass = jnp.zeros((p.shape[0], num_nodes), jnp.float32)
  mass = mass.at[:, parrays.pair_node].add(p[:, parrays.pair_leaf])  # [B, N]
  return jnp.log(mass), jnp.log(p)


def _prior_bias(trie: cons.TrieArrays, parrays: cons.PriorArrays, node_lm: jax.Array,
                leaf_lm: jax.Array, node: jax.Array, eos_id: int, weight: jax.Array) -> jax.Array:
  """[R, V] bias `weight * (log mass(child(node, t)) - log mass(node))` for each row at trie
  node `node` [R] (rows r // W of node_lm / leaf_lm [B, ...]); EOS at a title's end gets
  `weight * (log p(its leaf) - log mass(node))`. Summed along a path it telescopes to
  `weight * log p(leaf)`. Tokens that are not children get 0: the constraint masks them.

  Children come from the node's edge segment padded to the largest degree ([R, C]) and are
  scattered into the [R, V] row once; nothing per child is [R, V].
  """
  rows, vocab = node.shape[0], trie.vocab_size
  b = jnp.arange(rows) // (rows // node_lm.shape[0])  # [R] prompt of each beam row
  start, stop = trie.first_child[node], trie.first_child[node + 1]  # [R]
  idx = start[:, None] + jnp.arange(parrays.max_degree)  # [R, C]
  is_child = idx < stop[:, None]
  idx = jnp.minimum(idx, trie.token.shape[0] - 1)
  here = node_lm[b, node][:, None]  # [R, 1]
  # -inf - -inf would be NaN: a child (or leaf) without mass is unreachable, whatever `here` is.
  drop = lambda lm: jnp.where(lm > _NEG_INF, lm - here, _NEG_INF)
  step = drop(node_lm[b[:, None], idx])  # [R, C]
  own = drop(leaf_lm[b, trie.leaf_lo[node]][:, None])[:, 0]  # [R]
  # A zero weight must leave masses out entirely (0 * -inf is NaN): identical to no prior.
  scale = lambda x: jnp.where(weight > 0, weight * x, 0.0)
  tok = jnp.where(is_child, trie.token[idx], vocab)  # [R, C], V = dropped
  bias = jnp.zeros((rows, vocab), jnp.float32).at[jnp.arange(rows)[:, None], tok].set(
      scale(step), mode="drop")
  eos = jnp.where(trie.terminal[node], eos_id, vocab)  # [R]
  return bias.at[jnp.arange(rows), eos].set(scale(own), mode="drop")


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "num_beams", "num_return", "length_penalty", "eos_ids",
    "pad_id", "spec"))
def _beam_jit(graphdef, state, ids, mask, trie, history, prior, parrays, prior_weight, *,
              max_new_tokens, num_beams, num_return, length_penalty, eos_ids, pad_id, spec):
  _TRACES["count"] += 1
  model = nnx.merge(graphdef, state)
  batch, width, m = ids.shape[0], num_beams, max_new_tokens
  # The prompt's cache [B, K, T, Dh] becomes the W beams' shared prefix; each beam owns only
  # M slots for what it generates (see `_reorder_beams`).
  logits, prompt_cache = _prefill(model, ids, mask, ids.shape[1], 1)
  logits = shard(jnp.repeat(logits, width, axis=0), ("batch", None))  # [B*W, V]
  cache = model.init_cache(batch * width, m, prefix=prompt_cache)
  vocab = logits.shape[-1]
  cstate = None
  if spec is not None:
    if history is not None:
      history = jnp.repeat(history, width, axis=0)
    cstate = cons.init_state(trie, spec, batch * width, history)
  if prior is not None:
    node_lm, leaf_lm = _prior_log_masses(parrays, prior, trie.token.shape[0])  # [B, N], [B, L]
  neg = jnp.full((batch, num_return), _NEG_INF, jnp.float32)
  carry = _BeamCarry(
      step=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
      alive_scores=jnp.where(jnp.arange(width) == 0, 0.0, _NEG_INF)[None].repeat(batch, 0),
      alive_tokens=jnp.full((batch, width, m), pad_id, jnp.int32), cstate=cstate,
      done_scores=neg, done_sums=neg, done_tokens=jnp.full((batch, num_return, m), pad_id, jnp.int32),
      done_lengths=jnp.zeros((batch, num_return), jnp.int32),
      done_items=jnp.full((batch, num_return), -1, jnp.int32))

  def expand(c: _BeamCarry) -> tuple[_BeamCarry, jax.Array]:
    """Scores all W*V continuations, files finished ones, keeps the best W live ones."""
    logp = jax.nn.log_softmax(c.logits, axis=-1)  # [B*W, V] model log-probs
    if spec is not None:
      if prior is not None:
        logp = logp + _prior_bias(trie, parrays, node_lm, leaf_lm, c.cstate.node,
                                  spec.eos_token_id, prior_weight)
      logp = jnp.where(cons.allowed_tokens(trie, spec, c.cstate), logp, _NEG_INF)
    total = (c.alive_scores.reshape(-1, 1) + logp).reshape(batch, width * vocab)  # [B, W*V]
    cand_scores, cand = jax.lax.top_k(total, 2 * width)  # [B, 2W]
    parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
    ended = _is_eos(token, eos_ids) & (cand_scores > _NEG_INF)  # [B, 2W]
    cand_tokens = jnp.take_along_axis(c.alive_tokens, parent[..., None], axis=1)
    cand_tokens = cand_tokens.at[:, :, c.step].set(token)  # [B, 2W, M]
    # Finished hypotheses enter the pool of the R best.
    length = c.step + 1
    rank = jnp.where(ended, _penalised(cand_scores, length, length_penalty), _NEG_INF)
    cand_items = jnp.full((batch, 2 * width), -1, jnp.int32)
    if spec is not None:
      flat_parent = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)
      cand_items = trie.leaf_lo[c.cstate.node[flat_parent]].reshape(batch, 2 * width)
    done = _keep_best(
        jnp.concatenate([c.done_scores, rank], 1),
        jnp.concatenate([c.done_sums, jnp.where(ended, cand_scores, _NEG_INF)], 1),
        jnp.concatenate([c.done_tokens, cand_tokens], 1),
        jnp.concatenate([c.done_lengths, jnp.full((batch, 2 * width), length, jnp.int32)], 1),
        jnp.concatenate([c.done_items, cand_items], 1), k=num_return)
    # The W best unfinished continuations become the new beams.
    live = jnp.where(ended, _NEG_INF, cand_scores)
    alive_scores, parent, token, alive_tokens = _keep_best(
        live, parent, token, cand_tokens, k=width)  # [B, W]
    rows = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)  # [B*W]
    token = jnp.where(alive_scores > _NEG_INF, token, pad_id).reshape(-1)
    cstate = c.cstate
    if spec is not None:
      cstate = cons.advance(trie, spec, _gather_rows(cstate, rows), token)
    c = c.replace(alive_scores=alive_scores, alive_tokens=alive_tokens, cstate=cstate,
                  done_scores=done[0], done_sums=done[1], done_tokens=done[2],
                  done_lengths=done[3], done_items=done[4],
                  cache=_reorder_beams(c.cache, rows))
    return c, token

  def body(c: _BeamCarry) -> _BeamCarry:
    c, token = expand(c)
    logits, cache = _decode_step(model, token, c.cache)
    return c.replace(step=c.step + 1, logits=logits, cache=cache.constrain())

  def cond(c: _BeamCarry) -> jax.Array:
    # Log-probs (and prior steps, log mass(child) - log mass(node) <= 0) only decrease, so once no live beam can beat the R-th finished one, stop.
    best_len = m if length_penalty > 0 else c.step + 1
    best_live = _penalised(jnp.max(c.alive_scores, -1), best_len, length_penalty)  # [B]
    settled = jnp.all(best_live <= c.done_scores[:, -1])
    return (c.step < m) & ~settled

  carry = jax.lax.while_loop(cond, body, carry)
  scores, sums, tokens, lengths, items = (carry.done_scores, carry.done_sums, carry.done_tokens,
                                          carry.done_lengths, carry.done_items)
  if spec is None:
    # Unconstrained: hypotheses that never reached EOS still count (as in transformers).
    live_len = jnp.full((batch, width), m, jnp.int32)
    scores, sums, tokens, lengths = _keep_best(
        jnp.concatenate([scores, _penalised(carry.alive_scores, live_len, length_penalty)], 1),
        jnp.concatenate([sums, carry.alive_scores], 1),
        jnp.concatenate([tokens, carry.alive_tokens], 1),
        jnp.concatenate([lengths, live_len], 1), k=num_return)
  tokens = jnp.where((jnp.arange(m) < lengths[..., None]), tokens, pad_id)
  return BeamSearchOutput(tokens=tokens, lengths=lengths, scores=sums,
                          items=None if spec is None else items, steps=carry.step)


def beam_search(model: Qwen2ForCausalLM, input_ids: Any, attention_mask: Any, *,
                constraint: cons.CatalogConstraint | None, num_beams: int, num_return: int,
                max_new_tokens: int, length_penalty: float = 0.0,
                eos_token_id: int | Sequence[int] | None = None,
                pad_token_id: int = 0, prior: Any = None,
                prior_weight: float = 0.0) -> BeamSearchOutput:
  """Top-`num_return` sequences per prompt by beam search over `num_beams` beams.

  With a `CatalogConstraint` of one item, every beam is a trie path and a hypothesis finishes
  when it emits EOS after a complete title, so the results are distinct catalog items ranked by
  their log-probability under the model (the D3 / MiniOneRec way of producing a top-K list).
  Scores are unrenormalised model log-probs (the constraint removes continuations; it does not
  renormalise), so they equal brute-force scoring of each item. Without a constraint this is
  ordinary beam search ending at `eos_token_id`.

  CF-guided decoding (D3, Bao et al. 2024): with `prior` [B, L], a log-prior over the trie's
  leaves per prompt (e.g. `ItemTrie.leaf_log_prior` of a collaborative-filtering model's item
  log-probs; normalised here), a finished item scores
  `log p_LLM(title + EOS | prompt) + prior_weight * log p_prior(leaf)`. Partial titles are
  scored by the prior mass below their trie node: each token adds
  `prior_weight * (log mass(child) - log mass(node))`, which telescopes to the item's log-prior,
  so beams are pruned by the mixed score at every step, not only at the end. Leaves with zero
  prior mass (-inf) become unreachable when prior_weight > 0. `prior=None` is the plain search.
  """
  if num_return > num_beams:
    raise ValueError(f"num_return={num_return} cannot exceed num_beams={num_beams}")
  if constraint is not None and constraint.num_items != 1:
    raise ValueError("constrained beam search ranks single items: use num_items=1")
  eos = _eos_tuple(eos_token_id, constraint)
  if not eos:
    raise ValueError("beam search needs an eos_token_id (or a constraint)")
  batch, length = np.shape(input_ids)
  bucket = bucket_length(length)
  ids, mask = _left_align(input_ids, attention_mask, bucket, pad_token_id)
  trie, spec, history = _constraint_args(constraint, batch)
  parrays = weight = None
  if prior is not None:
    prior, parrays = _check_prior(constraint, prior, prior_weight, batch)
    weight = jnp.asarray(prior_weight, jnp.float32)  # traced: a weight sweep compiles once
  graphdef, state = nnx.split(model)
  return _beam_jit(
      graphdef, state, jnp.asarray(ids), jnp.asarray(mask), trie, history, prior, parrays, weight,
      max_new_tokens=int(max_new_tokens), num_beams=int(num_beams), num_return=int(num_return), length_penalty=float(length_penalty),
      eos_ids=eos, pad_id=int(pad_token_id), spec=spec)


def _check_prior(constraint: cons.CatalogConstraint | None, prior: Any, weight: float,
                 batch: int) -> tuple[jax.Array, cons.PriorArrays]:
  """Host: validates a leaf log-prior [B, L]; returns it on device and the trie's pair arrays."""
  if constraint is None:
    raise ValueError("a prior over catalog items needs a constraint (a CatalogConstraint)")
  if not (np.isfinite(weight) and weight >= 0):
    raise ValueError(f"prior_weight must be finite and >= 0, got {weight}")
  trie = constraint.trie
  if np.shape(prior) != (batch, trie.num_leaves):
    raise ValueError(f"prior must be [B={batch}, num_leaves={trie.num_leaves}] log-probs over "
                     f"the trie's leaves (ItemTrie.leaf_log_prior), got {np.shape(prior)}")
  prior = jnp.asarray(prior, jnp.float32)
  finite = jnp.isfinite(prior)
  if bool(jnp.any(jnp.isnan(prior) | (prior == jnp.inf))) or not bool(jnp.all(finite.any(-1))):
    raise ValueError("prior rows must be log-probs: no NaN or +inf, and at least one finite "
                     "entry per row (smooth zero-mass items, e.g. with popularity)")
  return prior, trie.prior_arrays()
