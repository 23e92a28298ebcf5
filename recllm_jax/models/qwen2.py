"""Qwen2-family decoder (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen) in Flax NNX.

Shape letters: B batch, T query length, S key/value (cache) length, D hidden, H query heads,
K key/value heads, G = H // K, Dh head dim, F MLP hidden, V vocabulary, L layers.

Every weight carries logical axis names (see `recllm_jax.sharding.LOGICAL_RULES`), and the main
activations are constrained with `sharding.shard`, so the same module runs on one device or an
FSDP x tensor-parallel mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from recllm_jax.models import fused_attention
from recllm_jax.models.config import Qwen2Config
from recllm_jax.sharding import shard


def _param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, names: Sequence[str],
           kind: type[nnx.Variable] = nnx.Param):
  key = rngs.params() if rngs is not None else jax.random.key(0)
  # Sharding is applied explicitly by `sharding.create_sharded` / `hf_io`, not eagerly here.
  # Sampled in fp32, then rounded: a bf16 model starts from its fp32 twin's weights (sampling
  # in bf16 draws different numbers), so precision settings can be compared run to run.
  return kind(init(key, tuple(shape), jnp.float32).astype(dtype), out_sharding=tuple(names),
              eager_sharding=False)


# Logical axes of the cached keys/values. Heads lead the slots so that one decode step reads
# each head's cache contiguously (no per-step transpose of the whole cache).
CACHE_AXES = ("batch", "act_kv_heads", "cache_length", None)


@flax.struct.dataclass
class KVCache:
  """Fixed-size key/value cache, a plain pytree so it can ride through `lax.while_loop`.

  Slots are written left to right: a (left-padded) prompt fills slots `[0, T)`, then each decode
  step writes one slot. `mask` marks slots that hold real tokens, so a row's next RoPE position is
  `mask.sum(-1)`.

  `prefix` (beam search) is an optional read-only cache of P < B rows that every row attends to
  before its own slots, row b seeing prefix row `b // (B // P)`: the W beams of a prompt then share
  one copy of the prompt's keys/values, and reordering beams only moves their own (generated)
  slots. Without it the pytree is exactly the plain cache.
  """

  k: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
  v: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
  mask: jax.Array  # [B, S] bool
  index: jax.Array  # [] int32, next slot to write
  prefix: "KVCache | None" = None  # [P, K, S', Dh] layers, shared by B // P consecutive rows

  @classmethod
  def init(cls, cfg: Qwen2Config, batch_size: int, max_length: int, dtype: Any = None,
           prefix: "KVCache | None" = None) -> "KVCache":
    dtype = cfg.jnp_dtype if dtype is None else dtype
    shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
    if prefix is not None and batch_size % prefix.mask.shape[0]:
      raise ValueError(f"KVCache of {batch_size} rows cannot share a prefix of "
                       f"{prefix.mask.shape[0]} rows: not a multiple")
    # Distinct buffers for every layer's k and v, so the whole cache can be donated.
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    return cls(k=zeros(), v=zeros(), mask=jnp.zeros((batch_size, max_length), bool),
               index=jnp.zeros((), jnp.int32), prefix=prefix).constrain()

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]

  def next_positions(self) -> jax.Array:
    """[B] RoPE position of each row's next token."""
    own = self.mask.sum(-1).astype(jnp.int32)
    if self.prefix is None:
      return own
    shared = self.prefix.next_positions()  # [P]
    return own + jnp.repeat(shared, own.shape[0] // shared.shape[0])

  def repeat(self, n: int) -> "KVCache":
    """B rows -> B*n rows (row b*n + i is a copy of row b): one prefill serves n samples.

    A prefix stays as it is: row b*n + i still maps to prefix row b // (B // P)."""
    rep = lambda x: jnp.repeat(x, n, axis=0)
    return KVCache(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)), mask=rep(self.mask),
                   index=self.index, prefix=self.prefix).constrain()

  def constrain(self) -> "KVCache":
    """Keeps the cache batch- (and head-) sharded under a mesh; a no-op without one."""
    kv = lambda xs: tuple(shard(x, CACHE_AXES) for x in xs)
    return KVCache(k=kv(self.k), v=kv(self.v), mask=shard(self.mask, ("batch", None)),
                   index=self.index, prefix=None if self.prefix is None else self.prefix.constrain())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
              prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None, *,
              impl: str = "xla", causal: bool = False) -> jax.Array:
  """Grouped-query attention by `impl` (`Qwen2Config.attention`); arguments as `einsum_attention`.

  'xla' is `einsum_attention`. 'cudnn' and 'splash' run a fused kernel
  (`models.fused_attention`) that never materialises the [B, K, G*T, S] scores, and fall back to
  the einsum for the calls it cannot serve (`fused_attention.fallback_reason`): cuDNN for fp32
  compute, unsupported head dims, decode steps (T=1) and the shared `prefix`; splash for every
  KV-cache call and the `prefix`. `causal` (a forward without a cache: query t at slot t, T == S)
  lets the kernels use their causal mask.
  """
  if impl != "xla" and fused_attention.fallback_reason(
      impl, dtype=q.dtype, head_dim=q.shape[-1], query_len=q.shape[1], causal=causal,
      prefix=prefix is not None) is None:
    if impl == "cudnn":
      return fused_attention.dot_product_attention(q, k, v, allowed, causal=causal)
    return fused_attention.splash_attention(q, k, v, allowed)
  return einsum_attention(q, k, v, allowed, prefix)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                     prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
  """Grouped-query attention. q: [B, T, H, Dh]; k, v: [B, K, S, Dh]; allowed: [B, T, S].

  The H query heads are grouped G = H // K per key/value head, so K/V are never repeated, and
  the G heads and T queries of a group are merged into one matrix (M = G*T rows): each (b, k)
  is then a single well-shaped matmul, which on CPU is ~2.7x faster at decode (T=1) and ~1.5x
  in training than keeping G and T as separate einsum dims. Logits and softmax are fp32 with a
  finite mask value, so fully padded query rows stay finite. With `attention(impl='xla')`,
  training, scoring and decoding all use this one function, so a sampler's log-probs and a
  trainer's come from the same arithmetic (a fused kernel serves the cache-free forward only:
  GRPO's old-policy log-probs come from that same forward, not from the sampler).

  `prefix` = (k, v, mask) of P rows ([P, K, S', Dh], [P, S']) that precede every query of the
  W = B // P consecutive rows sharing them (a beam search's prompt): their queries are stacked
  into one [W*G*T, Dh] matrix per (p, k), so the shared keys/values are read once, not W times,
  and one softmax runs over the S' + S slots.
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[1]
  g = h // kv_heads
  q = q.reshape(b, t, kv_heads, g, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  q = q.reshape(b, kv_heads, g * t, dh)  # [B, K, M, Dh]
  logits = jnp.einsum("bkmd,bksd->bkms", q, k,
                      preferred_element_type=jnp.float32) * (dh ** -0.5)  # [B, K, M, S]
  logits = logits.reshape(b, kv_heads, g, t, -1)  # [B, K, G, T, S]
  logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
  if prefix is None:
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v)  # [B, K, M, Dh]
    return out.reshape(b, kv_heads, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
  pk, pv, pmask = prefix
  p = pk.shape[0]
  w = b // p
  # [B, K, M, *] <-> [P, K, W*M, *]: rows b = p*W + i are B-major, so batch sharding carries over.
  to_shared = lambda x: x.reshape(p, w, kv_heads, g * t, -1).transpose(0, 2, 1, 3, 4).reshape(
      p, kv_heads, w * g * t, -1)
  from_shared = lambda x: x.reshape(p, kv_heads, w, g * t, -1).transpose(0, 2, 1, 3, 4).reshape(
      b, kv_heads, g * t, -1)
  shared = jnp.einsum("pkmd,pksd->pkms", to_shared(q), pk,
                      preferred_element_type=jnp.float32) * (dh ** -0.5)  # [P, K, W*M, S']
  shared = jnp.where(pmask[:, None, None], shared, jnp.finfo(jnp.float32).min)
  shared = from_shared(shared).reshape(b, kv_heads, g, t, -1)  # [B, K, G, T, S']
  probs = jax.nn.softmax(jnp.concatenate([shared, logits], -1), axis=-1).astype(v.dtype)
  width = pk.shape[2]
  probs = probs.reshape(b, kv_heads, g * t, -1)  # [B, K, M, S' + S]
  out = from_shared(jnp.einsum("pkms,pksd->pkmd", to_shared(probs[..., :width]), pv))  # [B, K, M, Dh]
  out = out + jnp.einsum("bkms,bksd->bkmd", probs[..., width:], v)  # [B, K, M, Dh]
  return out.reshape(b, kv_heads, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Matches HF: normalise in fp32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """[B, T] int positions -> cos, sin of shape [B, T, Dh] (fp32, HF's half-split layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, Dh]; cos/sin: [B, T, Dh]."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class Attention(nnx.Module):

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs | None):
    self.cfg = cfg
    d, h, k, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pd = cfg.jnp_param_dtype
    normal = nnx.initializers.normal(cfg.initializer_range)
    lora = _lora_for(cfg)
    self.q_proj = _Proj(rngs, normal, (d, h, dh), pd, ("embed", "q_heads", "head_dim"), bias=True,
                        lora=lora("q"))
    self.k_proj = _Proj(rngs, normal, (d, k, dh), pd, ("embed", "kv_heads", "head_dim"), bias=True,
                        lora=lora("k"))
    self.v_proj = _Proj(rngs, normal, (d, k, dh), pd, ("embed", "kv_heads", "head_dim"), bias=True,
                        lora=lora("v"))
    self.o_proj = _Proj(rngs, normal, (h, dh, d), pd, ("q_heads", "head_dim", "embed"), bias=False,
                        lora=lora("o"), lora_in=2)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
               prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    """x: [B, T, D]; allowed: [B, T, S] bool; prefix: a shared read-only (k, v, mask), see
    `attention`. Returns ([B, T, D], updated (k, v) or None)."""
    dt = self.cfg.jnp_dtype
    q = self.q_proj(x, "btd,dhk->bthk")  # [B, T, H, Dh]
    k = self.k_proj(x, "btd,dgk->btgk")  # [B, T, K, Dh]
    v = self.v_proj(x, "btd,dgk->btgk")  # [B, T, K, Dh]
    q = shard(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = shard(apply_rope(k, cos, sin).transpose(0, 2, 1, 3), CACHE_AXES)  # [B, K, T, Dh]
    v = shard(v.transpose(0, 2, 1, 3), CACHE_AXES)  # [B, K, T, Dh]
    new_kv = None
    if kv is not None:
      cache_k, cache_v = kv
      k = shard(jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, index, 0)),
                CACHE_AXES)  # [B, K, S, Dh]
      v = shard(jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, index, 0)),
                CACHE_AXES)
      new_kv = (k, v)
    if prefix is not None:
      prefix = (prefix[0].astype(dt), prefix[1].astype(dt), prefix[2])
    out = attention(q, k.astype(dt), v.astype(dt), allowed, prefix, impl=self.cfg.attention,
                    causal=kv is None)  # [B, T, H, Dh]
    out = self.o_proj(out, "bthk,hkd->btd")  # [B, T, D]
    return out, new_kv


def merge_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """kernel + scale * A @ B (A [in..., r], B [r, out...]), in fp32, cast to the kernel dtype."""
  rank = a.shape[-1]
  delta = a.astype(jnp.float32).reshape(-1, rank) @ b.astype(jnp.float32).reshape(rank, -1)
  return (kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)


class _Proj(nnx.Module):
  """A projection whose kernel keeps heads as a separate axis (einsum-friendly, shardable).

  With `lora=(rank, alpha)` it also holds a LoRA adapter (`nnx.LoRAParam`, fp32): A
  [in..., r] (the kernel's first `lora_in` axes, then the rank) and B [r, out...] (zeros, so a
  new adapter leaves the model unchanged), adding `alpha / rank * (x @ A) @ B` to the output.
  A and B keep the kernel's logical axis names on their in / out axes (the rank axis is
  replicated), so they shard like the kernel. `lora_enabled = False` (`lora_disabled`) drops
  the adapter from the forward: the frozen base model, e.g. GRPO's reference.
  """

  def __init__(self, rngs, init, shape, param_dtype, names, bias: bool,
               lora: tuple[int, float] | None = None, lora_in: int = 1):
    self.kernel = _param(rngs, init, shape, param_dtype, names)
    if bias:
      self.bias = _param(rngs, nnx.initializers.zeros, shape[1:], param_dtype, names[1:])
    self.lora_scale = None
    self.lora_enabled = True
    if lora is not None and lora[0] > 0:
      rank, alpha = lora
      self.lora_scale = float(alpha) / rank
      a_init = nnx.initializers.variance_scaling(
          1.0, "fan_in", "uniform", in_axis=tuple(range(lora_in)), out_axis=-1)
      self.lora_a = _param(rngs, a_init, (*shape[:lora_in], rank), jnp.float32,
                           (*names[:lora_in], None), kind=nnx.LoRAParam)
      self.lora_b = _param(rngs, nnx.initializers.zeros, (rank, *shape[lora_in:]), jnp.float32,
                           (None, *names[lora_in:]), kind=nnx.LoRAParam)

  def __call__(self, x: jax.Array, spec: str) -> jax.Array:
    """`spec` is an einsum whose input and output both start with the batch dims `bt`.

    Those two dims are flattened into one row dim before the matmul: XLA then sees a plain
    [rows, in] x [in, out] product, whose backward runs ~25% faster on CPU than with two batch
    dims in the contraction. The flatten keeps B major, so batch sharding is unaffected.
    """
    if not spec.startswith("bt") or "->bt" not in spec:
      raise ValueError(f"projection spec {spec!r} must map 'bt...' to 'bt...'")
    dt = x.dtype
    lead = x.shape[:2]
    y = jnp.einsum(spec.replace("bt", "n"), x.reshape(-1, *x.shape[2:]),
                   self.kernel[...].astype(dt))
    if self.lora_scale is not None and self.lora_enabled:
      inputs, rest = spec.split(",")
      kernel_axes, out = rest.split("->")
      x_axes, out = inputs[2:], out[2:]
      in_axes = kernel_axes[:self.lora_a[...].ndim - 1]
      xa = jnp.einsum(f"n{x_axes},{in_axes}r->nr", x.reshape(-1, *x.shape[2:]),
                      self.lora_a[...].astype(dt))  # [rows, r]
      y = y + jnp.einsum(f"nr,r{out}->n{out}", xa * jnp.asarray(self.lora_scale, dt),
                         self.lora_b[...].astype(dt))
    y = y.reshape(*lead, *y.shape[1:])
    if hasattr(self, "bias"):
      y = y + self.bias[...].astype(dt)
    return y


def _lora_for(cfg: Qwen2Config):
  """target name -> the `_Proj` `lora=` argument: (rank, alpha) for `cfg.lora_targets`, else None."""
  return lambda name: ((cfg.lora_rank, cfg.lora_alpha)
                       if cfg.lora_rank and name in cfg.lora_targets else None)


class _Embed(nnx.Module):

  def __init__(self, rngs, init, shape, param_dtype):
    self.embedding = _param(rngs, init, shape, param_dtype, ("vocab", "embed"))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs | None):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
    normal = nnx.initializers.normal(cfg.initializer_range)
    lora = _lora_for(cfg)
    self.gate_proj = _Proj(rngs, normal, (d, f), pd, ("embed", "mlp"), bias=False,
                           lora=lora("gate"))
    self.up_proj = _Proj(rngs, normal, (d, f), pd, ("embed", "mlp"), bias=False, lora=lora("up"))
    self.down_proj = _Proj(rngs, normal, (f, d), pd, ("mlp", "embed"), bias=False,
                           lora=lora("down"))

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate_proj(x, "btd,df->btf")  # [B, T, F]
    up = self.up_proj(x, "btd,df->btf")  # [B, T, F]
    h = shard(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return self.down_proj(h, "btf,fd->btd")  # [B, T, D]


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs | None):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                            cfg.jnp_param_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, cos, sin, allowed, kv, index, prefix=None, dropout=None):
    attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, index, prefix)
    attn_rng, mlp_rng = (None, None) if dropout is None else jax.random.split(dropout[0])
    x = x + _dropout(attn, dropout, attn_rng)
    x = x + _dropout(self.mlp(self.post_attention_layernorm(x)), dropout, mlp_rng)
    return shard(x, ("batch", "length", "act_embed")), new_kv


def _dropout(x: jax.Array, dropout: tuple[jax.Array, float] | None, rng: jax.Array | None):
  """Inverted dropout of `x` with (key, rate) `dropout`; identity when None."""
  if dropout is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - dropout[1], x.shape)
  return jnp.where(keep, x / (1.0 - dropout[1]), 0).astype(x.dtype)


def _layer_forward(layer: DecoderLayer, *args):
  return layer(*args)


_layer_forward_remat = nnx.remat(_layer_forward)


class Qwen2ForCausalLM(nnx.Module):
  """Causal LM. `model(input_ids, attention_mask)` -> fp32 logits [B, T, V].

  Positions come from the attention mask (`cumsum(mask) - 1`), so left-padded batches give the
  same logits at real tokens as unpadded ones. With `cache=`, the call also returns the updated
  `KVCache`; positions then continue from the tokens already in the cache.
  """

  def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None = None):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    normal = nnx.initializers.normal(cfg.initializer_range)
    self.embed_tokens = _Embed(rngs, normal, (cfg.vocab_size, cfg.hidden_size), pd)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if not cfg.tie_word_embeddings:
      self.lm_head = _Proj(rngs, normal, (cfg.hidden_size, cfg.vocab_size), pd,
                           ("embed", "vocab"), bias=False)

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None,
                 prefix: KVCache | None = None) -> KVCache:
    return KVCache.init(self.cfg, batch_size, max_length, dtype, prefix)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, dropout_rng: jax.Array | None = None):
    """input_ids, attention_mask: [B, T]. Returns fp32 logits [B, T, V], or with
    `return_hidden=True` the final-norm hidden states [B, T, D] (project a subset with
    `project_logits`, e.g. only the last prompt position, or sequence chunks with
    `output_head()` as `train.logprobs` does, so [B, T, V] never exists).
    With `cache=`, returns `(output, new_cache)`. `dropout_rng` turns on `cfg.dropout` (training
    only; without it, or with `cfg.dropout == 0`, the forward is deterministic).
    """
    cfg = self.cfg
    batch, length = input_ids.shape
    mask = (jnp.ones((batch, length), bool) if attention_mask is None
            else attention_mask.astype(bool))  # [B, T]
    if cache is None:
      index = None
      kv_mask = mask  # [B, S=T]
      offset = jnp.zeros((batch, 1), jnp.int32)
    else:
      index = cache.index
      kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))  # [B, S]
      offset = cache.next_positions()[:, None]
    if positions is None:
      positions = jnp.maximum(offset + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
    q_slot = jnp.arange(length) + (0 if index is None else index)  # [T]
    kv_slot = jnp.arange(kv_mask.shape[1])  # [S]
    allowed = kv_mask[:, None, :] & (kv_slot[None, None, :] <= q_slot[None, :, None])  # [B, T, S]

    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    x = jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0).astype(cfg.jnp_dtype)
    x = shard(x, ("batch", "length", "act_embed"))  # [B, T, D]
    dropout = None
    if dropout_rng is not None and cfg.dropout > 0:
      dropout_rng, embed_rng = jax.random.split(dropout_rng)
      x = _dropout(x, (embed_rng, cfg.dropout), embed_rng)
    # Remat only matters under a gradient; decoding (a cache) skips it: `nnx.remat` inside the
    # decoder's while_loop fails with a TraceContextError.
    forward = _layer_forward_remat if cfg.remat and cache is None else _layer_forward
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      prefix = None
      if cache is not None and cache.prefix is not None:
        prefix = (cache.prefix.k[i], cache.prefix.v[i], cache.prefix.mask)
      if dropout_rng is not None and cfg.dropout > 0:
        dropout = (jax.random.fold_in(dropout_rng, i), cfg.dropout)
      x, layer_kv = forward(layer, x, cos, sin, allowed, kv, index, prefix, dropout)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    x = self.norm(x)
    out = x if return_hidden else self.project_logits(x)
    if cache is None:
      return out
    return out, KVCache(k=tuple(new_k), v=tuple(new_v), mask=kv_mask, index=index + length,
                        prefix=cache.prefix)

  def project_logits(self, x: jax.Array) -> jax.Array:
    """[B, T, D] final hidden states -> fp32 logits [B, T, V]."""
    return self.output_head()(x)

  def output_head(self) -> "LMHead":
    """The LM head (tied embedding or `lm_head` kernel) as a pytree, for projecting hidden
    states outside the model, e.g. chunk by chunk over the sequence (`train.logprobs`)."""
    if self.cfg.tie_word_embeddings:
      return LMHead(self.embed_tokens.embedding[...], tied=True)
    return LMHead(self.lm_head.kernel[...], tied=False)


@flax.struct.dataclass
class LMHead:
  """Hidden states -> fp32 logits, as a plain pytree of the head weight.

  The weight keeps its stored layout (a tied embedding is [V, D], an untied kernel [D, V]): the
  einsum contracts the right axis, so neither layout is ever transposed into a copy. Being a
  pytree, it can be an explicit argument of `jax.checkpoint` / `lax.scan` bodies, and
  gradients w.r.t. it flow back to the model parameter it was read from.
  """

  weight: jax.Array  # [V, D] if tied else [D, V], the stored (param) dtype
  tied: bool = flax.struct.field(pytree_node=False)

  @property
  def vocab_size(self) -> int:
    return self.weight.shape[0 if self.tied else 1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] hidden states (compute dtype) -> fp32 logits [B, T, V], vocab-sharded."""
    rows = x.reshape(-1, x.shape[-1])  # [B*T, D]: a plain matmul, as in `_Proj`
    w = self.weight.astype(x.dtype)
    spec = "nd,vd->nv" if self.tied else "nd,dv->nv"
    logits = jnp.einsum(spec, rows, w, preferred_element_type=jnp.float32)  # [B*T, V]
    return shard(logits.reshape(*x.shape[:-1], -1), ("batch", "length", "act_vocab"))


def count_params(model: nnx.Module) -> int:
  """Number of parameters; works on abstract (`nnx.eval_shape`) models without allocating."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
