"""Per-device memory plan of a training run, from shapes alone: nothing is allocated.

A 1.5B GRPO run holds, on every device, its params, the optimizer state, gradients, a frozen
reference copy, the rollout's KV cache and the backward pass's activations. This module says
how much of each a config needs per device of a mesh, whether that fits a named accelerator,
and which mesh and micro-batch would, before any weights are downloaded or anything compiles
(`python scripts/plan.py`; formulas and tables in docs/planning.md).

What follows the code exactly, from `jax.eval_shape` of the real pieces:
  params          the model's `nnx.Param`s, each divided by its sharding (`sharding.
                  logical_shardings` on an `AbstractMesh` of the planned size);
  optimizer state `optim.make_optimizer(...).init` (AdamW moments, an fp32 master copy when
                  `train.master_dtype` is set, counters), laid out like `optim.init_train_state`
                  does (moments follow their parameter), plus the train state's step and RNG;
  KV cache        `KVCache.init` for the rollout, sharded by `models.qwen2.CACHE_AXES`: the
                  prompts' slots once (a group's G rows share them) and each row's new slots.
Derived from those: gradients (params-shaped; a second copy accumulates micro-batches) and the
GRPO reference model (a params copy, only when `grpo.beta > 0`).
Estimated by formula (see `layer_activation_bytes`, `lm_head_bytes`, `rollout_work_bytes`):
activations with and without remat, the chunked LM head's logits, and the rollout's prefill and
sampling buffers; attention scores follow `model.attention` (`attention_bytes`: a fused kernel
never writes them). XLA's own temporaries (fusion outputs, collective buffers) are not modelled.

A GRPO step has two phases that never overlap: the rollout (KV cache, no gradients) and the
update (gradients, activations, logits). The peak is the persistent state (params, optimizer,
reference) plus the larger phase.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from recllm_jax import buckets, sharding
from recllm_jax.errors import ConfigError, UserError
from recllm_jax.models import PRESETS, Qwen2ForCausalLM, fused_attention, vocab_size_for
from recllm_jax.models.config import Qwen2Config, resolve_attention
from recllm_jax.models.qwen2 import CACHE_AXES, KVCache
from recllm_jax.train import build, optim

GiB = 2**30
HF_PRESET = "deepseek-r1-distill-qwen-1.5b"  # the architecture of `model.preset='hf'` w/o weights
# Tokens of DeepSeek-R1-Distill-Qwen's tokenizer (151643 BPE + 22 added); its checkpoint has
# 151936 embedding rows, so up to 271 added tokens fit without growing it.
R1_TOKENIZER_SIZE = 151665


@dataclasses.dataclass(frozen=True)
class Device:
  """An accelerator to plan for: `hbm_bytes` is the memory one chip makes visible."""

  label: str
  hbm_bytes: int
  note: str = ""

  @property
  def is_gpu(self) -> bool:
    return not self.label.startswith("TPU")

  @property
  def platform(self) -> str:
    """`jax.default_backend()` on this device: what `model.attention='auto'` resolves against."""
    return "gpu" if self.is_gpu else "tpu"


# Visible memory per chip. GPUs: what the driver reports (nvidia-smi), a little under the
# datasheet's decimal GB; JAX itself preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise. TPUs: the HBM per chip.
DEVICES: dict[str, Device] = {
    "gpu-24gb": Device("24GB GPU", int(22.49 * GiB),
                       "L4 / A10 24 GB: 23,034 MiB visible (RTX 3090/4090: 24,564 MiB)"),
    "h100-80gb": Device("H100-80GB", int(79.6 * GiB), "80 GB HBM3; 81,559 MiB visible"),
    "h200": Device("H200", int(140.4 * GiB), "141 GB HBM3e; 143,771 MiB visible"),
    "tpu-v5e": Device("TPU v5e", 16 * GiB, "16 GiB HBM2e per chip"),
    "tpu-v5p": Device("TPU v5p", 95 * GiB, "95 GiB HBM2e per chip"),
    "tpu-v6e": Device("TPU v6e", 32 * GiB, "32 GiB HBM per chip"),
}
GPU_DEFAULT_MEM_FRACTION = 0.75  # JAX's default preallocation on GPUs
# Share of a device's memory kept free for what the plan does not model (XLA's fusion outputs
# and collective buffers, fragmentation): a plan fits when peak <= (1 - margin) x memory.
DEFAULT_MARGIN = 0.1


# --- the model --------------------------------------------------------------------------------


def _tokenizer_size(path: str | Path) -> int | None:
  """`len()` of the tokenizer `build.load_tokenizer` would load from `path`, None if unreadable."""
  key = str(path)
  if key not in _TOKENIZER_SIZES:
    try:
      import transformers
      _TOKENIZER_SIZES[key] = len(transformers.AutoTokenizer.from_pretrained(key))
    except Exception:  # noqa: BLE001  (not a tokenizer directory: plan without it)
      _TOKENIZER_SIZES[key] = None
  return _TOKENIZER_SIZES[key]


_TOKENIZER_SIZES: dict[str, int | None] = {}


def _grown(cfg: Qwen2Config, tokenizer_dir: str | Path | None, new_tokens: int,
           known_size: int | None = None) -> tuple[Qwen2Config, str]:
  """An HF architecture with the rows `build.build_model` grows it to for its tokenizer plus
  `new_tokens` added ones (`models.vocab_size_for`), and a note saying so."""
  base = known_size if known_size is not None else (
      _tokenizer_size(tokenizer_dir) if tokenizer_dir else None)
  assumed = base is None
  if assumed:  # no tokenizer to count: assume the checkpoint uses every row it has
    base = cfg.vocab_size
  rows = vocab_size_for(cfg.vocab_size, base + new_tokens)
  if rows == cfg.vocab_size:
    return cfg, ""
  how = (f"{cfg.vocab_size} rows assumed used" if assumed else f"{base} tokens")
  return cfg.replace(vocab_size=rows), f", vocab grown for {how} + {new_tokens} added"


def model_config_for(config: ml_collections.ConfigDict, new_tokens: int = 0,
                     platform: str | None = None) -> tuple[Qwen2Config, str]:
  """(architecture of the run with its dtypes, remat and attention, where it came from).

  Like `build.build_model`, but from config files only: `init_from` (an HF directory's
  config.json, or a workdir's saved run config, followed back to its root), `model.hf_path`'s
  config.json, else `model.preset`. `model.preset='hf'` without a readable `hf_path` plans the
  DeepSeek-R1-Distill-Qwen-1.5B architecture (its `models.PRESETS` entry), so no download is
  needed. A random-init preset gets `model.tokenizer_vocab_size` tokens (the size of the BPE a
  run would train; a `model.tokenizer_path` tokenizer may differ).

  `new_tokens` added tokens (e.g. `len(ItemCodec.new_tokens())`) are counted like the run
  counts them: on top of the BPE's size for a random init; for pretrained weights on top of
  their tokenizer (`model.tokenizer_path` or the HF directory's, else R1's 151665 tokens), and
  the embedding then grows as `build_model` grows it (only past the checkpoint's spare rows, to a
  multiple of 64). A trained workdir's checkpoint already holds its rows: they are read from it.

  `model.attention='auto'` resolves for `platform` (the planned device's; default: this
  process's backend), so a plan made on a CPU host for a GPU counts the GPU's kernel.
  """
  m = config.model
  numerics = {"param_dtype": m.param_dtype, "dtype": m.dtype, "remat": bool(m.remat),
              "attention": resolve_attention(m.get("attention", "auto"), platform)}
  init_from = config.get("init_from") or ""
  tokenizer_path = m.get("tokenizer_path") or ""
  if init_from:
    path = Path(init_from.partition("@")[0])
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
      saved = build.read_run_config(path)
      cfg, source = model_config_for(ml_collections.ConfigDict(
          {**saved.to_dict(), "model": {**saved.model.to_dict(), **numerics}}), new_tokens,
          platform)
      try:
        rows = build.saved_vocab_size(path, int(init_from.partition("@")[2] or 0) or None)
      except (OSError, ValueError, KeyError, UserError):
        rows = cfg.vocab_size  # no readable checkpoint yet: as its root would build it
      if rows != cfg.vocab_size:
        cfg, source = cfg.replace(vocab_size=rows), f"{source}, vocab {rows} from its checkpoint"
      return cfg, f"init_from={init_from} <- {source}"
    if (path / "config.json").is_file():
      cfg, grown = _grown(Qwen2Config.from_pretrained(path, **numerics), path, new_tokens)
      return cfg, f"init_from={init_from}{grown}"
  note = f"init_from={init_from!r} not found; " if init_from else ""
  if build.uses_pretrained(m):
    if m.hf_path and (Path(m.hf_path) / "config.json").is_file():
      cfg, grown = _grown(Qwen2Config.from_pretrained(m.hf_path, **numerics),
                          tokenizer_path or m.hf_path, new_tokens)
      return cfg, f"{note}model.hf_path{grown}"
    cfg, grown = _grown(PRESETS[HF_PRESET](**numerics), tokenizer_path, new_tokens,
                        None if tokenizer_path else R1_TOKENIZER_SIZE)
    return cfg, f"{note}model.preset='hf' without weights: the {HF_PRESET} preset{grown}"
  if m.preset not in PRESETS:
    raise ConfigError(f"model.preset={m.preset!r} is unknown; expected 'hf' or one of "
                      f"{sorted(PRESETS)}")
  overrides = {k: m[k] for k in build.ARCH_OVERRIDES if m.get(k)}
  added = f" + {new_tokens} added tokens" if new_tokens else ""
  return (PRESETS[m.preset](vocab_size=m.tokenizer_vocab_size + new_tokens, **overrides,
                            **numerics),
          f"{note}model.preset={m.preset!r}, vocab model.tokenizer_vocab_size{added}")


def make_optimizer(config: ml_collections.ConfigDict) -> Any:
  """The run's optax optimizer, as `train.loop.train` builds it (shapes do not depend on the
  schedule, so any schedule will do)."""
  tc = config.train
  extra = {"master_dtype": tc.master_dtype} if tc.get("master_dtype") else {}
  return optim.make_optimizer(optax.constant_schedule(tc.lr), weight_decay=tc.weight_decay,
                              max_grad_norm=tc.max_grad_norm, b1=tc.b1, b2=tc.b2, **extra)


_PARAMS_CACHE: dict[str, nnx.State] = {}


def abstract_params(cfg: Qwen2Config) -> nnx.State:
  """The model's `nnx.Param` state as shapes with logical names (cached per architecture)."""
  key = repr(cfg)
  if key not in _PARAMS_CACHE:
    abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    _PARAMS_CACHE[key] = nnx.split(abstract, nnx.Param)[1]
  return _PARAMS_CACHE[key]


def abstract_train_state(cfg: Qwen2Config, optimizer: Any) -> optim.TrainState:
  """`optim.init_train_state`'s state as shapes (`jax.eval_shape`)."""
  params = abstract_params(cfg)

  def init(p):  # `optim.init_train_state`'s state: moments for the trained params only
    trainable = optim.split_trainable(p, optim.trainable_filter(cfg))[0]
    return optim.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                            opt_state=optimizer.init(trainable),
                            rng=jax.random.key_data(jax.random.key(0)))

  return jax.eval_shape(init, params)


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
  """A `(data, fsdp, tensor)` mesh of that shape with no devices behind it."""
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def shard_bytes(x: Any, named: NamedSharding) -> int:
  """Bytes of one device's shard of `x` (a shape/dtype) laid out by `named`."""
  return math.prod(named.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def state_bytes(cfg: Qwen2Config, optimizer: Any, mesh: AbstractMesh) -> tuple[int, int]:
  """(params, optimizer state + step + RNG) bytes per device of the train state on `mesh`."""
  params = abstract_params(cfg)
  state = abstract_train_state(cfg, optimizer)
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, sharding.logical_shardings(params, mesh))
  layout = optim.state_shardings_following_params(state, placed)  # what init_train_state uses
  if layout is None:  # one device: nothing is split
    layout = jax.tree.map(lambda _: NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
  sizes = jax.tree.map(shard_bytes, state, layout)
  param_bytes = sum(jax.tree.leaves(sizes.params))
  return param_bytes, sum(jax.tree.leaves(sizes)) - param_bytes


def kv_cache_bytes(cfg: Qwen2Config, rows: int, slots: int, mesh: AbstractMesh) -> int:
  """Per-device bytes of `KVCache.init(cfg, rows, slots)` (k, v of every layer and the mask)."""
  cache = jax.eval_shape(lambda: KVCache.init(cfg, rows, slots))
  axes = {id(x): CACHE_AXES for x in (*cache.k, *cache.v)}
  total = 0
  for x in jax.tree.leaves(cache):
    names = axes.get(id(x), ("batch", None) if x.ndim == 2 else ())
    spec = sharding.logical_to_spec(names, x.shape, mesh)
    total += shard_bytes(x, NamedSharding(mesh, spec))
  return total


# --- estimates --------------------------------------------------------------------------------


def attention_scores_materialised(cfg: Qwen2Config, query_len: int, *, causal: bool) -> bool:
  """Whether `cfg.attention` runs the einsum, and so materialises the [B, K, G*T, S] scores, for
  a call of `query_len` queries: `causal` = a forward without a KV cache (training, scoring),
  else a prefill into a cache. Asks `fused_attention.fallback_reason`, as the model does."""
  return fused_attention.fallback_reason(
      cfg.attention, dtype=cfg.jnp_dtype, head_dim=cfg.head_dim, query_len=query_len,
      causal=causal, prefix=False) is not None


def attention_bytes(cfg: Qwen2Config, query_len: int, keys: int, *, causal: bool) -> int:
  """Bytes per query token one layer's attention holds besides q, k, v and its output.

  The einsum: (4 + c)*H*S, the fp32 probabilities over the S = `keys` slots and their
  compute-dtype copy. A fused kernel (`cfg.attention` 'cudnn' or 'splash', where it serves the
  call) never writes the scores: it keeps 4*H, an fp32 log-sum-exp per head for its backward,
  and cuDNN also c*S, the mask it reads as a [B, 1, T, S] compute-dtype bias.
  """
  c = jnp.dtype(cfg.dtype).itemsize
  h = cfg.num_attention_heads
  if attention_scores_materialised(cfg, query_len, causal=causal):
    return (4 + c) * h * keys
  return 4 * h + (c * keys if cfg.attention == "cudnn" else 0)


def layer_activation_bytes(cfg: Qwen2Config, seq_len: int) -> int:
  """Bytes one decoder layer keeps for its backward pass, per token, without remat.

  c = compute-dtype bytes (2 for bf16), fp32 = 4; D hidden, F MLP, H / K query / KV heads,
  Dh head width, T = `seq_len` keys per query:

      c*D            layer input
    + 2*(4 + c)*D    two RMSNorms: the fp32 input and the normalised output
    + c*(H + 2K)*Dh  q, k, v after RoPE
    + A              attention scores, `attention_bytes`: (4 + c)*H*T for the einsum
                     (probabilities, fp32 and their compute-dtype copy), 4*H (+ c*T for
                     cuDNN's mask) for a fused kernel
    + c*H*Dh + c*D   attention output (o_proj input) and the residual after attention
    + 3*c*F          MLP gate, up and silu(gate)*up (down_proj input)
  """
  c = jnp.dtype(cfg.dtype).itemsize
  d, f, h, k, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                    cfg.num_key_value_heads, cfg.head_dim)
  return (c * d + 2 * (4 + c) * d + c * (h + 2 * k) * dh
          + attention_bytes(cfg, seq_len, seq_len, causal=True)
          + c * h * dh + c * d + 3 * c * f)


def activation_bytes(cfg: Qwen2Config, tokens: int, seq_len: int, remat: bool) -> int:
  """Activations of a forward+backward over `tokens` (one device's micro-batch) of `seq_len`.

  Without remat every layer keeps `layer_activation_bytes`; with remat (`nnx.remat` per layer)
  each keeps only its c*D input, and the layer being recomputed holds a full set once. Both
  add the final norm's fp32 input and output, (4 + c)*D per token.
  """
  c = jnp.dtype(cfg.dtype).itemsize
  d, layers = cfg.hidden_size, cfg.num_hidden_layers
  per_layer = layer_activation_bytes(cfg, seq_len)
  kept = layers * c * d + per_layer if remat else layers * per_layer
  return tokens * (kept + (4 + c) * d)


def lm_head_bytes(cfg: Qwen2Config, rows: int, positions: int, chunk: int, *,
                  with_entropy: bool, vocab_shards: int = 1, head_grad: bool = True) -> int:
  """The chunked LM head of `train.logprobs` for `rows` rows of one device.

  Logits exist for one chunk of min(chunk, positions) positions at a time (all positions when
  chunk is 0): fp32 [rows, C, V] twice (logits and their gradient; 4 times with GRPO's entropy,
  which also keeps log-softmax and its exp). The head weight enters the chunk loop gathered
  over FSDP (replicated over the batch axes) in compute dtype, and its gradient is accumulated
  over the chunks in param dtype: D*V*(c + p); `head_grad=False` (LoRA: the head is frozen)
  drops the gradient, D*V*c.
  """
  c, p = jnp.dtype(cfg.dtype).itemsize, jnp.dtype(cfg.param_dtype).itemsize
  width = min(chunk, positions) if chunk > 0 else positions
  vocab = cfg.vocab_size // vocab_shards
  copies = 4 if with_entropy else 2
  return copies * rows * width * vocab * 4 + cfg.hidden_size * vocab * (c + (p if head_grad else 0))


def adapter_bytes(cfg: Qwen2Config, mesh: AbstractMesh) -> int:
  """Per-device bytes of the LoRA adapters (`nnx.LoRAParam`s) of `cfg` (0 without LoRA)."""
  if not cfg.lora_rank:
    return 0
  adapters = nnx.split_state(abstract_params(cfg), nnx.LoRAParam, ...)[0]
  return sum(jax.tree.leaves(jax.tree.map(shard_bytes, adapters,
                                          sharding.logical_shardings(adapters, mesh))))


def with_lora(cfg: Qwen2Config, config: ml_collections.ConfigDict) -> Qwen2Config:
  """`cfg` with the LoRA adapters of `config.model.lora` (none when its rank is 0)."""
  lora = build.lora_settings(config)
  if lora is None:
    return cfg.replace(lora_rank=0)
  return cfg.replace(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_targets=lora["targets"])


def rollout_work_bytes(cfg: Qwen2Config, prompts: int, rows: int, prompt_len: int,
                       slots: int) -> int:
  """Buffers of one rollout besides its KV cache, for one device's `prompts` (x G = `rows`).

  Prefill of the prompts (into the cache their G rows then share, counted by the caller): one
  layer's attention scores (`attention_bytes`: (4 + c)*H*S for the einsum, far less for a fused
  kernel) and MLP 3*c*F per token. Sampling: 4 fp32 [rows, V] arrays (logits, log-probs,
  sorted copy for top-p, CDF).
  """
  c = jnp.dtype(cfg.dtype).itemsize
  tokens = prompts * prompt_len
  prefill = tokens * (attention_bytes(cfg, prompt_len, slots, causal=False)
                      + 3 * c * cfg.intermediate_size)
  return prefill + 4 * rows * cfg.vocab_size * 4


# --- the plan ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one configuration (see the module docstring for each row)."""

  model: Qwen2Config
  model_source: str
  task: str  # "sft" | "grpo"
  mesh: tuple[int, int, int]  # (data, fsdp, tensor)
  grad_accum_steps: int
  remat: bool
  rows: int  # sequences per update, all devices
  micro_rows: int  # sequences of one micro-batch on one device
  seq_len: int  # tokens per training row
  params: int
  opt_state: int
  grads: int
  reference: int
  kv_cache: int
  kv_slots: int
  rollout_work: int
  activations_remat: int
  activations_no_remat: int
  lm_head: int
  adapters: int = 0  # LoRA adapters (trainable; `params` is then the frozen base)

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh)

  @property
  def activations(self) -> int:
    return self.activations_remat if self.remat else self.activations_no_remat

  @property
  def persistent(self) -> int:
    return self.params + self.adapters + self.opt_state + self.reference

  @property
  def rollout_peak(self) -> int:
    return self.persistent + self.kv_cache + self.rollout_work if self.task == "grpo" else 0

  @property
  def update_peak(self) -> int:
    return self.persistent + self.grads + self.activations + self.lm_head

  @property
  def peak(self) -> int:
    return max(self.rollout_peak, self.update_peak)

  def fits(self, device: Device, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the peak leaves `margin` of `device`'s memory free."""
    return self.peak <= (1.0 - margin) * device.hbm_bytes


def plan(config: ml_collections.ConfigDict, num_devices: int, *,
         model_cfg: Qwen2Config | None = None, mesh_shape: tuple[int, int, int] | None = None,
         grad_accum_steps: int | None = None, remat: bool | None = None,
         new_tokens: int = 0, device: Device | None = None) -> MemoryPlan:
  """The memory plan of `config` on `num_devices` devices.

  The mesh is `config.mesh` (a -1 axis takes the remaining devices) unless `mesh_shape` is
  given; `grad_accum_steps` and `remat` override `train.grad_accum_steps` / `model.remat`, and
  `model_cfg` the architecture (default: `model_config_for(config, new_tokens)`, which grows the
  vocabulary for `new_tokens` added tokens as the run would; `model.attention='auto'` resolved
  for `device`, default this process's backend). Raises ConfigError when the rows do not split
  over the batch devices and micro-batches, as the trainer would.
  """
  from recllm_jax.train import checks

  source = "given"
  if model_cfg is None:
    model_cfg, source = model_config_for(config, new_tokens,
                                         None if device is None else device.platform)
  remat = model_cfg.remat if remat is None else remat
  model_cfg = with_lora(model_cfg.replace(remat=remat), config)
  shape = mesh_shape or sharding.mesh_shape(config.mesh.data, config.mesh.fsdp,
                                            config.mesh.tensor, num_devices)
  mesh = abstract_mesh(*shape)
  accum = config.train.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  if accum < 1:
    raise ConfigError(f"train.grad_accum_steps={accum} must be >= 1")
  rows_name, rows = checks.batch_rows(config)
  factors = [(f"mesh.{a}={mesh.shape[a]}", mesh.shape[a]) for a in ("data", "fsdp")]
  checks.check_batch_split((rows_name, rows), factors + [(f"train.grad_accum_steps={accum}",
                                                          accum)])
  batch_split = sharding.batch_axis_size(mesh)
  micro_rows = rows // accum // batch_split
  tensor = shape[2] if model_cfg.vocab_size % shape[2] == 0 else 1

  params, opt_state = state_bytes(model_cfg, make_optimizer(config), mesh)
  # LoRA: `params` is the frozen base; gradients (and `opt_state`) cover the adapters only.
  adapters = adapter_bytes(model_cfg, mesh)
  params -= adapters
  grads = (adapters or params) * (2 if accum > 1 else 1)  # micro-batch gradient + running sum
  gc = config.get("grpo")
  chunk = config.train.logits_chunk_size
  if gc is None:
    task, seq_len, positions, kv, slots, work, reference = (
        "sft", config.data.max_length, config.data.max_length, 0, 0, 0, 0)
  else:
    task = "grpo"
    prompt_len = buckets.geometric_bucket(config.data.max_length)
    new = int(gc.max_new_tokens)
    seq_len, positions, slots = prompt_len + new - 1, new, prompt_len + new
    prompts = config.train.batch_size
    if rows > prompts:  # a group's rows share their prompt's cache as a prefix (decoding._prefill)
      kv = kv_cache_bytes(model_cfg, prompts, prompt_len, mesh) + kv_cache_bytes(
          model_cfg, rows, new, mesh)
      prefill_slots = prompt_len
    else:
      kv, prefill_slots = kv_cache_bytes(model_cfg, rows, slots, mesh), slots
    work = rollout_work_bytes(model_cfg, max(prompts // batch_split, 1), rows // batch_split,
                              prompt_len, prefill_slots)
    # LoRA: the reference is the base with the adapters off, no copy.
    reference = params if gc.beta > 0 and not adapters else 0
  tokens = micro_rows * seq_len
  return MemoryPlan(
      model=model_cfg, model_source=source, task=task, mesh=shape, grad_accum_steps=accum,
      remat=remat, rows=rows, micro_rows=micro_rows, seq_len=seq_len, params=params,
      opt_state=opt_state, grads=grads, reference=reference, kv_cache=kv, kv_slots=slots,
      rollout_work=work,
      activations_remat=activation_bytes(model_cfg, tokens, seq_len, True),
      activations_no_remat=activation_bytes(model_cfg, tokens, seq_len, False),
      lm_head=lm_head_bytes(model_cfg, micro_rows, positions, chunk,
                            with_entropy=task == "grpo", vocab_shards=tensor,
                            head_grad=not adapters),
      adapters=adapters)


def _divisors(n: int) -> Iterator[int]:
  return (d for d in range(1, n + 1) if n % d == 0)


def suggest(config: ml_collections.ConfigDict, device: Device, *,
            num_devices: int | None = None, max_devices: int = 1024,
            margin: float = DEFAULT_MARGIN, new_tokens: int = 0) -> MemoryPlan | None:
  """The smallest setup of `config` that fits `device`: fewest devices (fsdp = all of them,
  data = tensor = 1; or exactly `num_devices`), then the fewest micro-batches
  (`train.grad_accum_steps`), with `model.remat` as configured and, failing that, remat on.
  None when nothing up to `max_devices` fits. `new_tokens`: as in `model_config_for`."""
  from recllm_jax.train import checks

  model_cfg, _ = model_config_for(config, new_tokens, device.platform)
  rows = checks.batch_rows(config)[1]
  counts = [num_devices] if num_devices else [n for n in (2**i for i in range(11))
                                              if n <= min(rows, max_devices)]
  for remat in dict.fromkeys((bool(config.model.remat), True)):
    for n in counts:
      mesh_shape = (1, n, 1) if not num_devices else None
      for accum in _divisors(rows // n if rows % n == 0 else 0):
        try:
          p = plan(config, n, model_cfg=model_cfg, mesh_shape=mesh_shape,
                   grad_accum_steps=accum, remat=remat)
        except ConfigError:
          continue
        if p.fits(device, margin):
          return p
  return None


# --- report -----------------------------------------------------------------------------------


def _gib(n: int) -> str:
  return f"{n / GiB:8.2f}"


def format_plan(p: MemoryPlan, device: Device, margin: float = DEFAULT_MARGIN) -> str:
  """The per-device table of `p` against `device`'s memory (fits: `margin` left free)."""
  cfg = p.model
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
  data, fsdp, tensor = p.mesh
  lines = [
      f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}"
      f" ({p.model_source}); {n_params:,} params in {cfg.param_dtype}, compute {cfg.dtype}, "
      f"attention {cfg.attention}",
      f"device: {device.label} x{p.num_devices} ({device.hbm_bytes / GiB:.1f} GiB each); mesh "
      f"data={data} fsdp={fsdp} tensor={tensor}; {p.task}: {p.rows} rows/update, "
      f"grad_accum_steps={p.grad_accum_steps} -> {p.micro_rows} rows x {p.seq_len} tokens per "
      f"micro-batch per device; remat {'on' if p.remat else 'off'}",
      "",
      f"{'per device':40s} {'GiB':>8s}",
      f"{'params' + (' (frozen base)' if p.adapters else ''):40s} {_gib(p.params)}",
  ]
  if p.adapters:
    lines.append(f"{f'LoRA adapters (rank {cfg.lora_rank}, trainable)':40s} {_gib(p.adapters)}")
  lines += [
      f"{'optimizer state':40s} {_gib(p.opt_state)}",
      f"{'gradients' + (' (+ accumulator)' if p.grad_accum_steps > 1 else ''):40s} "
      f"{_gib(p.grads)}",
  ]
  if p.task == "grpo":
    lines += [
        f"{'reference model' if p.reference else 'reference (LoRA: base, adapters off)' if p.adapters else 'reference model (grpo.beta=0: none)':40s} "
        f"{_gib(p.reference)}",
        f"{f'KV cache ({p.rows // p.mesh[0] // p.mesh[1]} rows, {p.kv_slots} slots)':40s} "
        f"{_gib(p.kv_cache)}   rollout",
        f"{'rollout prefill + sampling (est.)':40s} {_gib(p.rollout_work)}   rollout"]
  lines += [
      f"{'activations, remat on (est.)':40s} {_gib(p.activations_remat)}   update"
      + ("" if p.remat else "   (not used)"),
      f"{'activations, remat off (est.)':40s} {_gib(p.activations_no_remat)}   update"
      + ("   (not used)" if p.remat else ""),
      f"{'LM head chunks + head grad (est.)':40s} {_gib(p.lm_head)}   update",
      "-" * 49]
  if p.task == "grpo":
    lines.append(f"{'peak, rollout phase':40s} {_gib(p.rollout_peak)}")
  lines.append(f"{'peak, update phase':40s} {_gib(p.update_peak)}")
  verdict = (f"fits (with {margin:.0%} headroom)" if p.fits(device, margin) else
             f"does NOT fit (with {margin:.0%} headroom)")
  lines.append(f"{'peak':40s} {_gib(p.peak)}   {p.peak / device.hbm_bytes:.0%} of "
               f"{device.hbm_bytes / GiB:.1f} GiB: {verdict}")
  if device.is_gpu and p.peak > GPU_DEFAULT_MEM_FRACTION * device.hbm_bytes:
    lines.append(f"note: JAX preallocates {GPU_DEFAULT_MEM_FRACTION:.0%} of GPU memory by "
                 "default; set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 for this run")
  return "\n".join(lines)


def format_suggestion(s: MemoryPlan | None, device: Device, scope: str) -> str:
  """One line naming the config flags of a suggested setup (`suggest`)."""
  if s is None:
    return f"suggestion ({scope}): nothing fits {device.label}"
  data, fsdp, tensor = s.mesh
  return (f"suggestion ({scope}): {s.num_devices} x {device.label} with --config.mesh.data="
          f"{data} --config.mesh.fsdp={fsdp} --config.mesh.tensor={tensor} "
          f"--config.train.grad_accum_steps={s.grad_accum_steps} --config.model.remat="
          f"{s.remat}: peak {s.peak / GiB:.1f} GiB of {device.hbm_bytes / GiB:.1f}")


__all__ = ["DEFAULT_MARGIN", "DEVICES", "Device", "GiB", "HF_PRESET", "MemoryPlan",
           "R1_TOKENIZER_SIZE", "abstract_mesh", "abstract_params",
           "abstract_train_state", "adapter_bytes", "with_lora",
           "activation_bytes", "attention_bytes", "attention_scores_materialised", "format_plan",
           "format_suggestion", "kv_cache_bytes",
           "layer_activation_bytes", "lm_head_bytes", "make_optimizer", "model_config_for",
           "plan", "rollout_work_bytes", "shard_bytes", "state_bytes", "suggest"]
