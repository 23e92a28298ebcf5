"""recllm_jax: JAX-native training of LLM recommenders (RecLLM-R1: SFT, then GRPO)."""

from recllm_jax._quiet_imports import silence_missing_torch_notice

silence_missing_torch_notice()  # before any submodule imports transformers

from recllm_jax.decoding import beam_search, generate
from recllm_jax.models import KVCache, Qwen2Config, Qwen2ForCausalLM
from recllm_jax.models.qwen2_hf import CheckpointError, export_hf, load_hf_model

__all__ = ["CheckpointError", "KVCache", "Qwen2Config", "Qwen2ForCausalLM", "beam_search",
           "export_hf", "generate", "load_checkpoint", "load_hf_model", "recommend"]


def __getattr__(name: str):  # PEP 562: the training stack (orbax, ml_collections) loads on use
  if name == "load_checkpoint":
    from recllm_jax.train.build import load_checkpoint
    return load_checkpoint
  if name == "recommend":
    from recllm_jax.inference import recommend
    return recommend
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
