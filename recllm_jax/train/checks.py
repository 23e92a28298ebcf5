"""Start-up checks of a run config: everything a user can get wrong, caught before any data,
weights or compiles load, as `UserError`s that name the config keys."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from recllm_jax import paths, sharding
from recllm_jax.data.loading import data_dir
from recllm_jax.errors import ConfigError, MissingPathError, UserErrors
from recllm_jax.models import fused_attention
from recllm_jax.models.config import dtype_from_name, resolve_attention
from recllm_jax.train import build

# Config keys holding paths (at any depth): `~` and `$VAR` are expanded in them.
_PATH_KEYS = ("workdir", "dir", "path", "init_from")
_PATH_SUFFIXES = ("_dir", "_path", "_file")


def _is_path_key(name: str) -> bool:
  return name in _PATH_KEYS or name.endswith(_PATH_SUFFIXES)


def expand_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with `~` and `$VAR` / `${VAR}` expanded in every path key.

  Path keys are `workdir`, `dir`, `path`, `init_from` and any `*_dir`, `*_path`, `*_file`, at
  any depth (`data.dir`, `model.hf_path`, `model.tokenizer_path`, ...). The shell does not expand
  `~` inside `--config.model.hf_path=~/models/x`, so without this such paths would not exist.
  URIs (`gs://bucket/run`) are left as they are.
  """
  config = config.copy_and_resolve_references()

  def visit(node: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in list(node.items()):
      if isinstance(value, ml_collections.ConfigDict):
        visit(value, f"{prefix}{key}.")
      elif isinstance(value, str) and value and _is_path_key(key) and not paths.is_uri(value):
        expanded = os.path.expandvars(os.path.expanduser(value))
        unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
        if unset:
          raise ConfigError(f"{prefix}{key}={value!r}: environment variable "
                            f"{unset.group(1)} is not set")
        node[key] = expanded

  visit(config, "")
  return config


def check_every_keys(config: ml_collections.ConfigDict) -> None:
  """Every `*_every` key (log, eval, checkpoint, ...) is a step interval >= 0; 0 means never."""

  def visit(node: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        visit(value, f"{prefix}{key}.")
      elif key.endswith("_every") and (not isinstance(value, int) or value < 0):
        raise ConfigError(f"{prefix}{key}={value!r} must be a step interval >= 0 (0 = never)")

  visit(config, "")


def is_due(step: int, every: int) -> bool:
  """Whether a `*_every` action runs after `step`: every `every` steps; `every=0` never."""
  return every > 0 and step % every == 0


def check_batch_split(rows: tuple[str, int], factors: Sequence[tuple[str, int]]) -> None:
  """Raises ConfigError unless `rows` splits evenly into the product of `factors`.

  Args:
    rows: (what, count) of the global batch rows, e.g. `("train.batch_size", 32)`; a trainer
      whose rows are derived names the product, e.g. `("train.batch_size x
      grpo.num_generations", 64)`.
    factors: (description, size) of everything the rows are divided by, e.g. from
      `batch_factors`: the batch mesh axes and `train.grad_accum_steps`. The descriptions
      appear verbatim in the message (`"train.grad_accum_steps=4"`).
  """
  name, count = rows
  total = math.prod(size for _, size in factors)
  if count <= 0 or count % total:
    parts = " x ".join(description for description, _ in factors)
    raise ConfigError(f"{name}={count} must be a positive multiple of {parts} = {total} "
                      "(every micro-batch is split evenly over the batch devices)")


def batch_factors(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> list[tuple[str, int]]:
  """(description, size) of the batch mesh axes (-1 resolved) and `train.grad_accum_steps`."""
  factors = []
  for axis in ("data", "fsdp"):
    size = mesh.shape[axis]
    note = " (-1: the remaining devices)" if config.mesh[axis] == -1 else ""
    factors.append((f"mesh.{axis}={size}{note}", size))
  accum = config.train.grad_accum_steps
  return factors + [(f"train.grad_accum_steps={accum}", accum)]


def check_paths(config: ml_collections.ConfigDict) -> None:
  """Input paths named by the config exist (the workdir and synthetic data are created); every
  missing one is reported (`UserErrors` when several)."""
  found = UserErrors()
  found.attempt(build.check_model_path, config)
  if config.model.tokenizer_path and not Path(config.model.tokenizer_path).exists():
    found.add(MissingPathError(
        f"model.tokenizer_path={config.model.tokenizer_path!r} does not exist"))
  if config.data.dir:
    root = found.attempt(data_dir, config, config.workdir)
    if root is not None and config.data.format != "synthetic" and not root.is_dir():
      found.add(MissingPathError(
          f"data.dir={config.data.dir!r} is not a directory (data.format={config.data.format!r})"))
  found.raise_found()


def check_config(config: ml_collections.ConfigDict,
                 *more_checks: Callable[[ml_collections.ConfigDict], object]
                 ) -> jax.sharding.Mesh:
  """All start-up checks, then `more_checks` (the task's); returns the mesh. Nothing slow (data,
  weights, compiles) runs first. Every independent error is reported, not only the first: one
  raises itself, several raise `UserErrors` (one line each)."""
  found = UserErrors()
  found.attempt(check_every_keys, config)
  if config.train.grad_accum_steps < 1:
    found.add(ConfigError(
        f"train.grad_accum_steps={config.train.grad_accum_steps} must be >= 1"))
  found.attempt(build.check_model_choice, config)
  found.attempt(build.lora_settings, config)
  found.attempt(check_precision, config)
  found.attempt(check_attention, config)
  found.attempt(profile_steps, config)
  mesh = found.attempt(sharding.make_mesh, config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  if mesh is not None and config.train.grad_accum_steps >= 1:
    found.attempt(check_batch_split, batch_rows(config), batch_factors(config, mesh))
  found.attempt(check_paths, config)
  for check in more_checks:
    found.attempt(check, config)
  found.raise_found()
  return mesh


def check_attention(config: ml_collections.ConfigDict) -> None:
  """`model.attention` names an implementation whose kernel runs on this platform."""
  fused_attention.check_platform(resolve_attention(config.model.get("attention", "auto")))


def check_precision(config: ml_collections.ConfigDict) -> None:
  """`train.master_dtype` is '' or 'float32', and only set for low-precision params."""
  master = config.train.master_dtype
  if not master:
    return
  if master != "float32":
    raise ConfigError(f"train.master_dtype={master!r}; expected '' (none) or 'float32'")
  if build.lora_settings(config):
    raise ConfigError(
        f"train.master_dtype={master!r} with model.lora.rank={config.model.lora.rank}: LoRA "
        "adapters are always fp32 (only they are updated), so a master copy is never needed; "
        "set train.master_dtype=''")
  if jnp.dtype(dtype_from_name(config.model.param_dtype)) == jnp.float32:
    raise ConfigError(
        f"train.master_dtype={master!r} keeps an fp32 copy of low-precision params, but "
        f"model.param_dtype={config.model.param_dtype!r} already is fp32; set "
        "model.param_dtype=bfloat16 or train.master_dtype=''")


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`profile.steps` "N:M" -> (N, M), 1-based loop steps, both included; "" -> None."""
  spec = config.profile.steps
  if not spec:
    return None
  first, sep, last = str(spec).partition(":")
  if (not sep or not first.strip().isdigit() or not last.strip().isdigit()
      or not 1 <= int(first) <= int(last)):
    raise ConfigError(f"profile.steps={spec!r} must be 'N:M' with 1 <= N <= M (loop steps "
                      "N to M, both included), or '' for no profile")
  return int(first), int(last)


def batch_rows(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(what, count) of the rows one update sees: sequences for SFT; for GRPO prompts x G."""
  if config.get("grpo") is not None:
    return ("train.batch_size x grpo.num_generations",
            config.train.batch_size * config.grpo.num_generations)
  return ("train.batch_size", config.train.batch_size)


__all__ = ["batch_factors", "batch_rows", "check_batch_split", "check_config",
           "check_every_keys", "check_paths", "check_precision", "expand_paths", "is_due",
           "profile_steps"]
