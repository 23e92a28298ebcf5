"""Per-token log-probs (and entropies) of a causal LM without materialising [B, T, V] logits.

With a 152k vocabulary the logits are the largest array of a training step: 32 x 1024 x
151,936 fp32 is 20 GB, and its gradient as much again. `chunked_token_logprobs` walks over the
sequence `chunk_size` positions at a time: each chunk's logits [B, C, V] are computed, reduced
to per-token values and dropped, and the backward pass recomputes them (`jax.checkpoint`)
instead of keeping them. Peak memory is then about two [B, C, V] fp32 arrays instead of two
[B, T, V] (benchmarks/vocab_memory.py), plus a fixed few D x V buffers in which the head's
gradient is accumulated over the chunks in fp32. The price is one extra LM-head matmul per token
in the backward pass (2*D*V FLOPs; ~4% of a 1.5B model's training FLOPs).

Chunks run over the sequence rather than the flattened B*T rows, so every chunk keeps the
batch sharding of the hidden states, and `LMHead` keeps the model's vocabulary (tensor-parallel)
sharding of the logits. The unchunked path (`chunk_size=0`) applies the same per-token
arithmetic (`token_logprobs`) to the model's full logits, so the two paths differ only in how
the LM-head matmul groups its rows.

Shape letters: B batch, T length, C chunk, N = ceil(T / C) chunks, D hidden, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from recllm_jax import sharding
from recllm_jax.models.qwen2 import LMHead

__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_token_logprobs", "model_token_logprobs",
           "token_logprobs"]

# Sequence positions per logits chunk. One chunk's fp32 logits are B_dev x 128 x V x 4 bytes:
# 2.5 GB for the paper's 32 sequences on one device with a 152k vocabulary (8x less than the
# full 1024-token logits), less when the batch is split over devices; the backward pass holds
# ~2 such arrays. 128 x B_dev rows still make the [rows, D] x [D, V] matmul large enough for an
# accelerator's matrix units, and 1024-token rows need only 8 loop steps.
DEFAULT_CHUNK_SIZE = 128

LogProbs = jax.Array | tuple[jax.Array, jax.Array]


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   with_entropy: bool = False) -> LogProbs:
  """[B, T, V] logits, [B, T] int targets -> [B, T] fp32 log p(target) under
  softmax(logits / temperature); with `with_entropy`, also that distribution's [B, T] entropy.

  Both are differentiable (GRPO's entropy bonus needs the entropy's gradient). `temperature` is
  a Python float (a static setting, as in `decoding.sampling_logprobs`).
  """
  _check_temperature(temperature)
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  # A gather, not a one-hot mask: inside the chunk loop, JAX would hoist the mask's [B, C, V]
  # iota (loop-invariant) out of the loop as one more live [B, C, V] array. XLA partitions this
  # gather over a vocab-sharded V without gathering the logits.
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  logp = target_logit - log_z
  if not with_entropy:
    return logp
  # -sum p log p on the log-probs (not log_z - sum p z), which avoids cancelling two large
  # terms for peaked distributions.
  all_logp = logits - log_z[..., None]  # [B, T, V]
  entropy = -jnp.sum(jnp.exp(all_logp) * all_logp, axis=-1)  # [B, T]
  return logp, entropy


def chunked_token_logprobs(hidden: jax.Array, head: LMHead, targets: jax.Array, *,
                           chunk_size: int, temperature: float = 1.0,
                           with_entropy: bool = False) -> LogProbs:
  """`token_logprobs(head(hidden), targets, ...)`, `chunk_size` positions at a time.

  Args:
    hidden: [B, T, D] final-norm hidden states (`model(..., return_hidden=True)`).
    head: the model's `output_head()`.
    targets: [B, T] int token ids whose log-probs to return.
    chunk_size: sequence positions per chunk (> 0); T need not be a multiple of it.
    temperature, with_entropy: as in `token_logprobs`.

  Returns:
    [B, T] fp32 log-probs, or (log-probs, entropies) with `with_entropy`. No [B, T, V] array is
    live in the forward or the backward pass.
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
  _check_temperature(temperature)
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"targets {targets.shape} do not match hidden states {hidden.shape[:2]}")
  scan = functools.partial(_scan_chunks, chunk_size=chunk_size, temperature=temperature,
                           with_entropy=with_entropy)
  batch_axes = _batch_mesh_axes(hidden.shape[0])
  if not batch_axes:
    return scan(hidden, head, targets)
  # Under a batch-sharded mesh, run the scan per batch shard (`shard_map`, manual over the batch
  # axes only; the tensor axis stays automatic, so the vocabulary stays sharded). The head enters
  # replicated over the batch axes, so FSDP gathers it once and its gradient is summed over the
  # batch shards once. Left to XLA's propagation, the chunk loop would all-reduce the full
  # [D, V] head gradient in every iteration instead.
  inner_rules = _drop_mesh_axes(sharding.active_rules(), batch_axes)

  def per_shard(hidden, head, targets):
    # Mark the head as varying over the batch shards here, outside the loop: the transpose of
    # this cast is the one cross-shard sum of its gradient. (Left implicit, the cast would
    # happen at its use inside the loop body, and so would the sum.)
    # The cast is made in fp32 (a no-op for fp32 params), so that sum runs in fp32: bf16
    # partial gradients summed in bf16 lose precision, and XLA:CPU's AllReducePromotion
    # aborts on a bf16 psum ("Invalid binary instruction opcode copy", jax 0.10.2).
    head = jax.tree.map(
        lambda w: jax.lax.pcast(w.astype(jnp.float32), batch_axes, to="varying").astype(w.dtype),
        head)
    with sharding.logical_rules(inner_rules):
      return scan(hidden, head, targets)

  rows = P(batch_axes)
  return jax.shard_map(per_shard, in_specs=(rows, P(), rows), out_specs=rows,
                       axis_names=set(batch_axes))(hidden, head, targets)


def _scan_chunks(hidden: jax.Array, head: LMHead, targets: jax.Array, *, chunk_size: int,
                 temperature: float, with_entropy: bool) -> LogProbs:
  batch, length, _ = hidden.shape
  chunk = min(chunk_size, length)
  n = -(-length // chunk)
  pad = n * chunk - length
  # Padded positions (zero hidden state, target 0) give finite values that are sliced off, so
  # they add nothing to the gradient.
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))  # [B, N*C, D]
  targets = jnp.pad(targets, ((0, 0), (0, pad)))  # [B, N*C]
  hs = hidden.reshape(batch, n, chunk, -1).swapaxes(0, 1)  # [N, B, C, D]
  hs = sharding.shard(hs, (None, "batch", "length", "act_embed"))
  ys = targets.reshape(batch, n, chunk).swapaxes(0, 1)  # [N, B, C]

  def one_chunk(head: LMHead, h: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
    h = sharding.shard(h, ("batch", "length", "act_embed"))  # [B, C, D]
    out = token_logprobs(head(h), y, temperature=temperature, with_entropy=with_entropy)
    return out if with_entropy else (out,)

  # Save only the chunk's inputs; the backward pass recomputes its [B, C, V] logits.
  # prevent_cse=False is safe (and faster) inside a scan, per the jax.checkpoint docs.
  one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
  _, outs = jax.lax.scan(lambda carry, xs: (carry, one_chunk(head, *xs)), None, (hs, ys))
  outs = tuple(o.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length] for o in outs)  # [B, T]
  return outs if with_entropy else outs[0]


def _batch_mesh_axes(batch: int) -> tuple[str, ...]:
  """The mesh axes (of the `jax.set_mesh` mesh) that split a batch of `batch` rows."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  axes = sharding.logical_to_spec(("batch",), (batch,), mesh)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _drop_mesh_axes(rules: sharding.LogicalRules,
                    axes: tuple[str, ...]) -> sharding.LogicalRules:
  """`rules` without `axes` (manual inside `shard_map`, so no constraint may name them)."""
  def keep(mapped):
    kept = tuple(a for a in ((mapped,) if isinstance(mapped, str) else mapped or ())
                 if a not in axes)
    return kept or None
  return tuple((name, keep(mapped)) for name, mapped in rules)


def model_token_logprobs(model: Any, input_ids: jax.Array, attention_mask: jax.Array,
                         targets: jax.Array, *, chunk_size: int, temperature: float = 1.0,
                         with_entropy: bool = False, last: int | None = None,
                         dropout_rng: jax.Array | None = None) -> LogProbs:
  """Runs a `Qwen2ForCausalLM` and returns `token_logprobs` of `targets` [B, T].

  `chunk_size` > 0 projects the hidden states chunk by chunk (`chunked_token_logprobs`);
  0 projects all positions at once (the [B, T, V] reference path, for tests and comparisons).
  `last` projects only the last `last` positions and returns [B, last]: GRPO scores only the
  completion, which sits at the end of every row, so the prompt never meets the LM head.
  `dropout_rng` turns on the model's training dropout (`Qwen2Config.dropout`).
  """
  if chunk_size < 0:
    raise ValueError(f"logits chunk_size must be >= 0 (0 = unchunked), got {chunk_size}")
  if last is not None:
    targets = targets[:, -last:]
  if chunk_size == 0:
    logits = model(input_ids, attention_mask, dropout_rng=dropout_rng)
    return token_logprobs(logits if last is None else logits[:, -last:], targets,
                          temperature=temperature, with_entropy=with_entropy)
  hidden = model(input_ids, attention_mask, return_hidden=True,
                 dropout_rng=dropout_rng)  # [B, T, D]
  if last is not None:
    hidden = hidden[:, -last:]  # [B, last, D]
  return chunked_token_logprobs(hidden, model.output_head(), targets, chunk_size=chunk_size,
                                temperature=temperature, with_entropy=with_entropy)
