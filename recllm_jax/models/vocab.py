"""Growing a model's vocabulary for added tokens (e.g. semantic-ID item tokens `<a_12>`).

A pretrained checkpoint has one embedding row (and one LM-head column when untied) per token
id. Tokens added to its tokenizer after pretraining need rows of their own; `grow_vocab` appends
them, leaving every existing row bit-identical, so the grown model's logits for the old tokens
are the old model's (up to float rounding: XLA may tile a wider [D, V] matmul differently).

Initialisation of the new rows (embedding and, when untied, LM head), per weight W of V rows:

    new row = mean(W rows) + noise_scale * std(W rows) * N(0, 1)   (mean, std per dimension)

The mean makes a new token start as "an average token": its logit is about the average logit,
so adding hundreds of tokens barely moves the softmax over the old ones (a random or zero init
would either take probability mass or leave the rows stuck together), and its embedding looks
like a typical input to the first layer. The small per-dimension noise breaks the symmetry
between the new tokens, so they can learn distinct roles (HF `resize_token_embeddings` uses the
same mean with a far smaller noise). Statistics are taken over all V existing rows in fp32,
including any unused padding rows a checkpoint may carry.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from recllm_jax import sharding
from recllm_jax.models.qwen2 import Qwen2ForCausalLM

# Vocabularies are grown to a multiple of this: matmul- and shard-friendly ([D, V] tiles, a
# vocab axis divisible by any power-of-two tensor-parallel size up to 64), like HF's
# `resize_token_embeddings(pad_to_multiple_of=64)`. The spare rows are never produced by the
# tokenizer.
VOCAB_MULTIPLE = 64
DEFAULT_NOISE_SCALE = 0.1


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """`num_tokens` rounded up to a multiple of `multiple` (the size `grow_vocab` is given)."""
  return -(-num_tokens // multiple) * multiple


def vocab_size_for(model_vocab: int, num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """The embedding rows a `model_vocab`-row checkpoint needs for a `num_tokens` tokenizer.

  Unchanged while the checkpoint's rows (including its spare padding rows, e.g. 151936 rows for
  R1's 151665 tokens) suffice; otherwise `num_tokens` rounded up to `multiple`.
  """
  return model_vocab if num_tokens <= model_vocab else padded_vocab_size(num_tokens, multiple)


def _vocab_axis(var: nnx.Variable) -> int | None:
  names = var.get_metadata().get("out_sharding") or ()
  return list(names).index("vocab") if "vocab" in names else None


def _target_sharding(old: jax.Array, names: Any, shape: tuple[int, ...]) -> Any:
  """The old array's sharding for the new shape: its own spec when the new shape still divides
  over it, else what the logical rules give that shape (a replicated vocab axis, say)."""
  current = old.sharding
  if not isinstance(current, NamedSharding):
    return current  # one device: any shape fits
  mesh, spec = current.mesh, current.spec
  ways = lambda axes: int(np.prod([mesh.shape[a] for a in (
      () if axes is None else (axes,) if isinstance(axes, str) else axes)]))
  fits = all(shape[i] % ways(axes) == 0 for i, axes in enumerate(spec))
  if not fits:
    spec = sharding.logical_to_spec(names or (None,) * len(shape), shape, mesh)
  return NamedSharding(mesh, spec)


def _grown(weight: jax.Array, axis: int, new_rows: int, key: jax.Array, noise_scale: float,
           out_sharding: Any) -> jax.Array:
  """`weight` with `new_rows` rows appended along `axis`, initialised as the module docstring
  says, created directly in `out_sharding`."""

  def grow(w, key):  # w: [..., V, ...] with the vocab at `axis`
    rows = jnp.moveaxis(w, axis, 0).astype(jnp.float32)  # [V, D]
    mean = rows.mean(axis=0)  # [D]
    std = rows.std(axis=0)  # [D]
    noise = jax.random.normal(key, (new_rows, *rows.shape[1:]), jnp.float32)  # [N, D]
    new = (mean + noise_scale * std * noise).astype(w.dtype)  # [N, D]
    return jnp.concatenate([w, jnp.moveaxis(new, 0, axis)], axis=axis)  # old rows untouched

  return jax.jit(grow, out_shardings=out_sharding)(weight, key)


def grow_vocab(model: Qwen2ForCausalLM, vocab_size: int, *, seed: int = 0,
               noise_scale: float = DEFAULT_NOISE_SCALE) -> Qwen2ForCausalLM:
  """`model` with `vocab_size` embedding rows (and LM-head columns when untied).

  No-op (the same model) when `model.cfg.vocab_size >= vocab_size`. Otherwise a new model whose
  `cfg.vocab_size == vocab_size`: existing rows are bit-identical, new ones are the mean of the
  existing rows plus Gaussian noise of `noise_scale` x their per-dimension std (see the module
  docstring), drawn from `seed`. Every parameter keeps its sharding: untouched ones are the very
  same arrays (shared with `model`, not copied), grown ones are created in their old layout
  (or, when the new size no longer divides over it, the logical rules' layout for it), so a
  model built by `sharding.create_sharded` or `load_hf_model(mesh=...)` stays sharded.
  """
  cfg = model.cfg
  if vocab_size <= cfg.vocab_size:
    return model
  new_cfg = cfg.replace(vocab_size=int(vocab_size))
  abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(new_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  old = {k: v for k, v in nnx.to_flat_state(nnx.state(model))}
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(state)):
    value = old[path].get_value()
    shape = tuple(var.get_value().shape)
    if tuple(value.shape) != shape:
      axis = _vocab_axis(var)
      if axis is None or value.shape[axis] != cfg.vocab_size:
        raise ValueError(f"{'.'.join(map(str, path))}: shape {value.shape} cannot grow to "
                         f"{shape} along the vocabulary")
      names = var.get_metadata().get("out_sharding")
      value = _grown(value, axis, vocab_size - cfg.vocab_size, jax.random.fold_in(key, i),
                     noise_scale, _target_sharding(value, names, shape))
    var.set_value(value)
  return nnx.merge(graphdef, state)


__all__ = ["DEFAULT_NOISE_SCALE", "VOCAB_MULTIPLE", "grow_vocab", "padded_vocab_size",
           "vocab_size_for"]
