"""Typed configuration of a Qwen2-family decoder, built from an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from recllm_jax.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# HF keys we read, or know to be harmless. Anything else that changes the math must be
# rejected explicitly below rather than silently ignored.
_SUPPORTED_ROPE_TYPES = ("default", None)


# Projections LoRA can adapt: attention q, k, v, o and the MLP's gate, up, down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def parse_lora_targets(targets: str | tuple[str, ...] | list[str],
                       key: str = "lora_targets") -> tuple[str, ...]:
  """'q,v' / ('q', 'v') -> ('q', 'v') in `LORA_TARGETS` order; an unknown name is a ConfigError
  naming `key`."""
  names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
  names = [t for t in names if t]
  unknown = sorted(set(names) - set(LORA_TARGETS))
  if unknown:
    raise ConfigError(f"{key}={targets!r}: unknown target(s) {unknown}; expected a "
                      f"comma-separated subset of {','.join(LORA_TARGETS)}")
  return tuple(t for t in LORA_TARGETS if t in names)


def dtype_from_name(name: str | Any) -> Any:
  """Maps 'bfloat16' / jnp.bfloat16 / 'torch.bfloat16' to a jnp dtype."""
  if not isinstance(name, str):
    return jnp.dtype(name).type
  key = name.removeprefix("torch.")
  if key not in _DTYPES:
    raise ConfigError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[key]


def dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


# Attention implementations (`Qwen2Config.attention`, run-config key `model.attention`); see
# `models.qwen2.attention` for what each one runs and where it falls back to the einsum.
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
ATTENTION_CHOICES = (*ATTENTION_IMPLS, "auto")
# What 'auto' picks per platform (`jax.default_backend()`): anything else (CPU) keeps the einsum.
_AUTO_ATTENTION = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}


def resolve_attention(name: str, platform: str | None = None) -> str:
  """The implementation `name` stands for on `platform` (default: `jax.default_backend()`).

  'auto' becomes 'cudnn' on GPU, 'splash' on TPU and 'xla' elsewhere; an explicit choice is
  kept as it is (a fused kernel on the wrong platform is refused when the model is traced, so
  a CPU host can still build configs and plans for an accelerator). Raises ConfigError for an
  unknown name.
  """
  if name not in ATTENTION_CHOICES:
    raise ConfigError(f"model.attention={name!r} is not one of {list(ATTENTION_CHOICES)}")
  if name != "auto":
    return name
  platform = jax.default_backend() if platform is None else platform
  return _AUTO_ATTENTION.get(platform, "xla")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Architecture and numerics of a Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen decoder.

  Attributes:
    vocab_size: rows of the token embedding and columns of the LM head.
    hidden_size: model width D.
    intermediate_size: SwiGLU hidden width F.
    num_hidden_layers: number of decoder blocks L.
    num_attention_heads: query heads H.
    num_key_value_heads: key/value heads K (H % K == 0; H // K is the GQA group size).
    head_dim: per-head width; None derives it as hidden_size // num_attention_heads, and
      `replace` derives it again when either of those changes.
    rope_theta: RoPE base frequency.
    rms_norm_eps: epsilon inside every RMSNorm.
    tie_word_embeddings: the LM head reuses the embedding matrix (no `lm_head.weight`).
    max_position_embeddings: longest sequence the checkpoint was trained for (informational;
      RoPE itself has no hard limit).
    attention_bias: q/k/v projections carry a bias (always True for Qwen2).
    initializer_range: stddev of the normal init used for random-init models.
    bos_token_id, eos_token_id, pad_token_id: special ids copied into the exported config.
    param_dtype: storage dtype of the weights ('float32' or 'bfloat16').
    dtype: compute dtype of matmuls and activations; norms, softmax and logits stay fp32.
    remat: rematerialise each decoder block in the backward pass (saves activation memory).
    lora_rank, lora_alpha, lora_targets: LoRA adapters (rank 0 = none) on the named projections
      (`LORA_TARGETS`); each adds `lora_alpha / lora_rank * x @ A @ B` to its projection.
    dropout: residual dropout rate (after the embedding and on each block's attention and MLP
      outputs, as in GPT-2 and SASRec), applied only when the forward gets a `dropout_rng`
      (SFT of random-init models on small data); 0 = none, and it never changes inference.
    attention: attention implementation, one of `ATTENTION_CHOICES`: 'xla' (the grouped-query
      einsum, the reference), 'cudnn' (cuDNN flash attention, NVIDIA GPUs), 'splash' (the
      Pallas splash-attention kernel, TPUs) or 'auto', which `resolve_attention` turns into the
      platform's choice when the config is made, so the field always holds a concrete name.
      Where a fused kernel cannot serve a call it falls back to the einsum (`qwen2.attention`).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  attention_bias: bool = True
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  dropout: float = 0.0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  attention: str = "xla"

  def __post_init__(self):
    # Not a dataclass field (so not compared, hashed or passed to __init__): whether head_dim
    # was derived, so that `replace(hidden_size=...)` derives it again instead of keeping a
    # width that no longer matches.
    object.__setattr__(self, "_head_dim_derived", self.head_dim is None)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ConfigError(
            f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
            f"{self.num_attention_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
    for field in ("param_dtype", "dtype"):
      object.__setattr__(self, field, dtype_name(dtype_from_name(getattr(self, field))))
    object.__setattr__(self, "attention", resolve_attention(self.attention))
    object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
    if self.lora_rank < 0:
      raise ConfigError(f"lora_rank={self.lora_rank} must be >= 0 (0 = no LoRA)")
    if self.lora_rank and not self.lora_targets:
      raise ConfigError(f"lora_rank={self.lora_rank} but lora_targets is empty")

  @property
  def jnp_dtype(self) -> Any:
    return dtype_from_name(self.dtype)

  @property
  def jnp_param_dtype(self) -> Any:
    return dtype_from_name(self.param_dtype)

  def summary(self, num_params: int) -> str:
    """One short line: size, shape and numerics (the whole config is long: log it at DEBUG)."""
    lora = f", LoRA rank {self.lora_rank}" if self.lora_rank else ""
    return (f"Qwen2 {num_params / 1e6:.3g}M params ({self.num_hidden_layers} layers, hidden "
            f"{self.hidden_size}, vocab {self.vocab_size}), {self.param_dtype} params, "
            f"{self.dtype} compute, attention {self.attention}{lora}")

  def replace(self, **changes: Any) -> "Qwen2Config":
    """A copy with `changes`; a derived head_dim is derived again from the new sizes.

    Use this rather than `dataclasses.replace`, which cannot tell a derived head_dim from an
    explicit one and would keep the old width.
    """
    if self._head_dim_derived and "head_dim" not in changes:
      changes = {**changes, "head_dim": None}
    return dataclasses.replace(self, **changes)

  # --- HF interop -------------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                   **overrides: Any) -> "Qwen2Config":
    """Reads both the transformers 4.x and 5.x layouts of a Qwen2 `config.json`.

    4.x: `rope_theta`, `rope_scaling`, `torch_dtype`. 5.x: `rope_parameters`, `dtype`.
    Settings that change the math and are not implemented raise ConfigError.
    """
    model_type = hf.get("model_type", "qwen2")
    if model_type not in ("qwen2",):
      raise ConfigError(f"{source}: model_type={model_type!r} is not a Qwen2-family model")
    if hf.get("use_sliding_window", False):
      raise ConfigError(f"{source}: use_sliding_window=true is not supported "
                        "(sliding-window attention is not implemented)")
    hidden_act = hf.get("hidden_act", "silu")
    if hidden_act != "silu":
      raise ConfigError(f"{source}: hidden_act={hidden_act!r} is not supported (only 'silu')")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                        "(only the default RoPE is implemented)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ConfigError(f"{source}: missing required keys {missing}")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=dtype,
        dtype=dtype,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "Qwen2Config":
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
      raise FileNotFoundError(f"{config_file} not found: not an HF checkpoint directory")
    with open(config_file) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}:{e.lineno}: invalid JSON: {e.msg}") from e
    return cls.from_hf_dict(hf, source=config_file, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers `Qwen2Config` kwargs describing this model."""
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings,
        initializer_range=self.initializer_range,
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        tie_word_embeddings=self.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=self.bos_token_id,
        eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id,
        torch_dtype=self.param_dtype,
    )


# --- presets ----------------------------------------------------------------------------------


def deepseek_r1_distill_qwen_1_5b(**overrides: Any) -> Qwen2Config:
  """DeepSeek-R1-Distill-Qwen-1.5B (the RecLLM-R1 base model): 1,777,088,000 parameters."""
  cfg = Qwen2Config(
      vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
      num_attention_heads=12, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=False, max_position_embeddings=131072,
      bos_token_id=151646, eos_token_id=151643, param_dtype="bfloat16", dtype="bfloat16")
  return cfg.replace(**overrides)


def benchmark_model(**overrides: Any) -> Qwen2Config:
  """The random model the generation and SFT benchmarks use (hidden 512, 8 layers)."""
  cfg = Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
  return cfg.replace(**overrides)


def tiny(**overrides: Any) -> Qwen2Config:
  """A laptop-sized Qwen2 for smoke runs and tests."""
  cfg = Qwen2Config(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    tie_word_embeddings=True)
  return cfg.replace(**overrides)


PRESETS = {
    "deepseek-r1-distill-qwen-1.5b": deepseek_r1_distill_qwen_1_5b,
    "benchmark": benchmark_model,
    "tiny": tiny,
}
