"""Shared fixtures: tiny random Qwen2 checkpoints built with transformers at test time."""

from __future__ import annotations

import os
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


@pytest.fixture
def office_dir() -> Path:
  if not OFFICE_DIR.exists():
    pytest.skip(f"real Amazon-2018 Office data not found at {OFFICE_DIR}")
  return OFFICE_DIR


def pytest_configure(config):
  # Tests that need a mesh use 8 simulated CPU devices; must be set before jax initialises.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
