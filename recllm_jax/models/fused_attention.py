"""Fused attention kernels behind `models.qwen2.attention` (`Qwen2Config.attention`).

Shape letters as in `models.qwen2`: B batch, T queries, S key/value slots, H query heads, K
key/value heads, G = H // K, Dh head dim. Every function here takes the einsum's operands
(q: [B, T, H, Dh]; k, v: [B, K, S, Dh], the KV cache's heads-first layout; allowed: [B, T, S]
bool) and returns [B, T, H, Dh], so `attention` can swap them for the einsum call by call.

  cudnn   `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN flash attention on
          NVIDIA GPUs. GQA is native (K < H heads, K/V are not repeated); `allowed` becomes the
          kernel's boolean mask (cuDNN adds it as a [B, 1, T, S] bias, per call, in the compute
          dtype) and, without a cache, `is_causal` lets it skip the upper triangle.
  splash  the Pallas TPU splash-attention kernel for causal self-attention without a cache:
          `allowed` is then "causal and key not padding", i.e. a static causal mask plus
          segment ids (padding = segment 0). Untested on a TPU here (none was available); it
          runs in Pallas' interpret mode on CPU in the tests.

`fallback_reason` says, from static shapes and dtypes alone, which calls a kernel cannot serve;
`attention` runs the einsum for those.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from recllm_jax.errors import ConfigError

# cuDNN flash attention: bf16/fp16 inputs, a head dim that is a multiple of 8 and at most 128
# (256 on Hopper and later; 128 is what every GPU generation accepts, and Qwen2 uses 64 / 128).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
# Splash tiles queries and keys in blocks of this many slots; shorter or ragged sequences are
# padded up to a multiple of it.
SPLASH_BLOCK = 128
# The platform (`jax.default_backend()`) each kernel compiles on, and what to call it.
_PLATFORMS = {"cudnn": ("gpu", "an NVIDIA GPU"),
              "splash": ("tpu", "a TPU (the Pallas splash-attention kernel only compiles there)")}


def check_platform(impl: str, platform: str | None = None) -> None:
  """Raises ConfigError when `impl`'s kernel cannot run on `platform` (default: this process's
  `jax.default_backend()`); 'xla' runs everywhere."""
  if impl not in _PLATFORMS:
    return
  platform = jax.default_backend() if platform is None else platform
  needed, what = _PLATFORMS[impl]
  if platform != needed:
    raise ConfigError(f"model.attention={impl!r} needs {what} but the platform is "
                      f"{platform!r}; use 'auto' or 'xla'")


def fallback_reason(impl: str, *, dtype: Any, head_dim: int, query_len: int, causal: bool,
                    prefix: bool) -> str | None:
  """Why `impl` cannot serve an attention call of this kind (the einsum runs instead), or None.

  `causal`: a forward without a KV cache, where query t sits at slot t (T == S) and `allowed`
  is "causal and key not padding". `prefix`: the beam-search / rollout shared-prompt path.
  Static arguments only, so the planner (`plan.attention_scores_materialised`) asks the same
  question from a config.
  """
  if impl == "xla":
    return "model.attention='xla' is the einsum"
  if prefix:
    # The fused kernels take one K/V per row; feeding them the shared prompt would repeat it
    # W = B // P times, which is exactly the copy the prefix path exists to avoid.
    return "shared prompt prefix (one K/V per prompt, not per row)"
  if impl == "cudnn":
    if jnp.dtype(dtype) not in tuple(map(jnp.dtype, CUDNN_DTYPES)):
      return f"cuDNN needs bf16/fp16 inputs, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
      return f"cuDNN needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}"
    if query_len == 1:
      # One query row has no scores worth fusing away, and the public API's [B, S, K, Dh]
      # layout would transpose the whole [B, K, S, Dh] cache every decode step.
      return "decode step (T=1): the einsum reads the cache in place"
    return None
  if impl == "splash":
    if not causal:
      # Splash's mask is static (built in numpy), but a cache's write index is traced.
      return "KV-cache call: splash's causal mask cannot follow the cache's write index"
    return None
  raise ValueError(f"unknown attention implementation {impl!r}")


def _uniform_if_empty(q: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(q, allowed) with each query row that may attend no slot (left padding) zeroed and allowed
  every slot.

  The einsum masks with a finite value, so such a row's softmax is uniform over all S slots; a
  zero query over all slots gives the same uniform weights (and, like the einsum, no gradient to
  q or k), and no kernel ever sees an empty row, whose softmax denominator would be 0. With
  the kernel's own causal mask on top the row averages slots 0..t instead: still finite, and no
  real token reads a padding row.
  """
  empty = ~allowed.any(-1)  # [B, T]
  return jnp.where(empty[:, :, None, None], jnp.zeros((), q.dtype), q), allowed | empty[:, :, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
                          causal: bool, implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention` on the einsum's operands; [B, T, H, Dh].

  `implementation='cudnn'` is the fused GPU kernel; 'xla' is JAX's own einsum version of the
  same call, which runs on CPU and tests this wrapper (layouts, mask, padding) there.
  """
  if implementation == "cudnn":
    check_platform("cudnn")
  t, s = q.shape[1], k.shape[2]
  q, allowed = _uniform_if_empty(q, allowed)
  k = k.transpose(0, 2, 1, 3)  # [B, S, K, Dh]
  v = v.transpose(0, 2, 1, 3)  # [B, S, K, Dh]
  # cuDNN's backward with a bias (our mask) needs even T and S: pad a query row that attends
  # everything real and a slot nobody attends, then drop the row.
  pad_t, pad_s = t % 2, s % 2
  if pad_t or pad_s:
    q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))  # [B, T', H, Dh]
    k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))  # [B, S', K, Dh]
    v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    allowed = jnp.pad(allowed, ((0, 0), (0, pad_t), (0, 0)), constant_values=True)
    allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, pad_s)), constant_values=False)  # [B, T', S']
  out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], is_causal=causal,
                                     implementation=implementation)  # [B, T', H, Dh]
  return out[:, :t]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """The Pallas TPU splash-attention kernel, for causal self-attention without a cache (T == S);
  [B, T, H, Dh]. `interpret` runs the kernel in Pallas' interpreter (any platform, for tests).

  Query rows that are padding attend earlier padding (their own segment), not every slot as in
  the einsum: their outputs differ from it but stay finite, and no real row ever reads them.
  """
  if not interpret:
    check_platform("splash")
  # Imported here: a TPU-only kernel that no other path needs.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, h, dh = q.shape
  kv_heads = k.shape[1]
  g = h // kv_heads
  width = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  # Without a cache allowed[b, t, s] = key s is real and s <= t, so its last row is the key mask.
  segments = jnp.pad(allowed[:, -1].astype(jnp.int32), ((0, 0), (0, width - t)))  # [B, S']
  pad = ((0, 0), (0, 0), (0, width - t), (0, 0))
  # Splash does not scale the logits: scale q, as the einsum scales its logits.
  q = (q * dh ** -0.5).astype(q.dtype).reshape(b, t, kv_heads, g, dh).transpose(0, 2, 3, 1, 4)
  q = jnp.pad(q.reshape(b, kv_heads * g, t, dh), pad).reshape(b, kv_heads, g, width, dh)
  k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # [B, K, S', Dh]
  mask = splash.MultiHeadMask([splash.CausalMask((width, width))] * g)
  kernel = splash.make_splash_mqa_single_device(mask, interpret=interpret)
  # One MQA kernel per KV head: its G query heads share that head's keys/values (no repeat).
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # [K, G, S', Dh]
  ids = splash.SegmentIds(q=segments, kv=segments)
  out = jax.vmap(per_head)(q, k, v, ids)  # [B, K, G, S', Dh]
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
