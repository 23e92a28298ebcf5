"""Shared fixtures: tiny random Qwen2 checkpoints built with transformers at test time."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICE_DIR = (REPO_ROOT / ".." / "shared" / "data" / "amazon18" / "Office_Products").resolve()

TINY_HF_CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_hf_model(seed: int = 0, **overrides: Any):
  """A random fp32 `transformers` Qwen2ForCausalLM (eval mode) with biases made non-zero."""
  import torch
  import transformers

  cfg = transformers.Qwen2Config(**{**TINY_HF_CONFIG, **overrides})
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(cfg).eval().float()
  with torch.no_grad():
    # HF inits biases and norms to constants; randomise them so parity really tests them.
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


@pytest.fixture(scope="session", name="build_hf_model")
def build_hf_model_fixture() -> Callable[..., Any]:
  """`build_hf_model` as a fixture, for module-scoped fixtures (conftest is not importable)."""
  return build_hf_model


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
  """Factory: `path, torch_model = hf_checkpoint(max_shard_size=None, **config_overrides)`."""

  def make(max_shard_size: str | None = None, seed: int = 0, name: str = "hf", **overrides):
    model = build_hf_model(seed, **overrides)
    path = tmp_path / name
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path, model

  return make


@pytest.fixture(scope="session")
def r1_tokenizer(tmp_path_factory):
  """The DeepSeek-R1-Distill stand-in of tests/r1_tokenizer.py (real template, tiny BPE).

  Its directory is `r1_tokenizer.name_or_path` (usable as `model.tokenizer_path`).
  """
  from r1_tokenizer import build_r1_tokenizer

  return build_r1_tokenizer(tmp_path_factory.mktemp("r1_tokenizer"))


@pytest.fixture
def office_dir() -> Path:
  if not OFFICE_DIR.exists():
    pytest.skip(f"real Amazon-2018 Office data not found at {OFFICE_DIR}")
  return OFFICE_DIR


MESH_DEVICES = 8
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto` (pyproject.toml): one worker per core, at most 4. Each worker loads jax and torch
  and builds its files' fixtures (~3 GB at the most), and most of a test's time is single-threaded
  XLA compilation, so even 2 cores run two test files at once at nearly full speed."""
  return max(1, min(os.cpu_count() or 1, 4))


def pytest_configure(config):
  # Mesh tests need 8 simulated CPU devices. A user's own count (e.g. 2) is overridden rather than
  # respected: with fewer devices those tests could only skip, and the suite would pass without
  # any sharding coverage. Must be set before jax initialises its backends.
  flags = _DEVICE_COUNT_FLAG.sub("", os.environ.get("XLA_FLAGS", "")).split()
  os.environ["XLA_FLAGS"] = " ".join(
      [*flags, f"--xla_force_host_platform_device_count={MESH_DEVICES}"])
  # The suite is a CPU suite (the references are CPU torch): on a GPU host the simulated CPU
  # devices must still be the default platform. An explicit JAX_PLATFORMS is respected.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  if jax.device_count() < MESH_DEVICES:
    raise pytest.UsageError(
        f"tests/conftest.py: the mesh tests need {MESH_DEVICES} devices but jax sees "
        f"{jax.device_count()} {jax.default_backend()} device(s). XLA_FLAGS forces "
        f"{MESH_DEVICES} host CPU devices, which only works if jax's backends were not initialised "
        "before this hook and the default platform is the CPU; run with JAX_PLATFORMS=cpu.")
