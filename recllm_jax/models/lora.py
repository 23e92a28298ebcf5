"""LoRA adapters on a `Qwen2ForCausalLM`: add them to a base model, switch them off, merge them.

A LoRA model is the base model with `Qwen2Config.lora_rank > 0`: each projection named in
`lora_targets` (q, k, v, o, gate, up, down) holds `nnx.LoRAParam` A [in..., r] and B [r, out...]
(`qwen2._Proj`) and adds `lora_alpha / lora_rank * x @ A @ B`. Everything else is the frozen
base. Training differentiates and updates only the `nnx.LoRAParam`s (`train.optim`), the
checkpoints hold only them (`train.checkpoint`), GRPO's reference model is the same model with
the adapters switched off (`lora_disabled`: no second copy of the weights), and an export
merges them into the kernels (`merge_lora`), so the HF model computes what the LoRA model does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from recllm_jax.models.config import Qwen2Config
from recllm_jax.models.qwen2 import Qwen2ForCausalLM, _Proj, merge_kernel

__all__ = ["add_lora", "base_config", "lora_disabled", "lora_param_count",
           "merge_lora", "set_lora_enabled"]


def _projections(model: nnx.Module) -> Iterator[tuple[tuple, _Proj]]:
  for path, module in nnx.iter_modules(model):
    if isinstance(module, _Proj):
      yield path, module


def set_lora_enabled(model: nnx.Module, enabled: bool) -> None:
  """Switches every adapter of `model` on or off (a static attribute: inside a jitted function,
  set it on the model `nnx.merge` just built; off, the forward is exactly the base model's)."""
  for _, proj in _projections(model):
    proj.lora_enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """`with lora_disabled(model):` runs the frozen base model (adapters off), then turns them on."""
  set_lora_enabled(model, False)
  try:
    yield model
  finally:
    set_lora_enabled(model, True)


def base_config(cfg: Qwen2Config) -> Qwen2Config:
  """`cfg` without adapters."""
  return cfg.replace(lora_rank=0)


def add_lora(model: Qwen2ForCausalLM, rank: int, alpha: float, targets: Any, *, seed: int,
             mesh: jax.sharding.Mesh | None = None) -> Qwen2ForCausalLM:
  """`model` (its weights shared, not copied) with fresh adapters: A random, B zero, so the
  new model computes exactly what `model` does. The adapters are created directly in their
  sharded layout on `mesh`; the base initialisers traced alongside are dead code under jit."""
  from recllm_jax import sharding

  if model.cfg.lora_rank:
    raise ValueError("the model already has LoRA adapters; merge them first (merge_lora)")
  cfg = model.cfg.replace(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=targets)
  if not cfg.lora_rank:
    return model
  build = lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract_lora, _ = nnx.split(sharding.abstract_module(build), nnx.LoRAParam, ...)
  out = None if mesh is None else sharding.logical_shardings(abstract_lora, mesh)
  adapters = jax.jit(lambda: nnx.state(build(), nnx.LoRAParam), out_shardings=out)()
  return nnx.merge(graphdef, adapters, nnx.state(model))


@functools.lru_cache(maxsize=None)
def _merger(scale: float, out_sharding: Any):
  """One jitted `merge_kernel` per (scale, sharding), so that the 7 projections of every layer
  reuse its compilations (one per kernel shape) instead of compiling each of ~200 kernels."""
  return jax.jit(functools.partial(merge_kernel, scale=scale), out_shardings=out_sharding)


def merge_lora(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
  """A model without adapters whose kernels are `W + alpha / rank * A @ B` (computed in fp32,
  stored in the kernel's dtype and sharding); `model` itself when it has none."""
  from recllm_jax import sharding

  if not model.cfg.lora_rank:
    return model
  cfg = base_config(model.cfg)
  merged = {}
  for path, proj in _projections(model):
    if proj.lora_scale is not None:
      kernel = proj.kernel[...]
      merge = _merger(proj.lora_scale, getattr(kernel, "sharding", None))
      merged[(*path, "kernel")] = merge(kernel, proj.lora_a[...], proj.lora_b[...])
  graphdef = nnx.graphdef(sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg,
                                                                             rngs=nnx.Rngs(0))))
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  flat = [(k, v.replace(value=merged[k]) if k in merged else v)
          for k, v in nnx.to_flat_state(base)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def lora_param_count(model: nnx.Module) -> int:
  """Number of adapter parameters (0 without LoRA)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
