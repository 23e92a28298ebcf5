"""recllm_jax: JAX-native training of LLM recommenders (RecLLM-R1: SFT, then GRPO)."""

from recllm_jax.decoding import beam_search, generate
from recllm_jax.hf_io import export_hf, load_hf_model
from recllm_jax.models import KVCache, Qwen2Config, Qwen2ForCausalLM

__all__ = ["KVCache", "Qwen2Config", "Qwen2ForCausalLM", "beam_search", "export_hf", "generate",
           "load_hf_model"]
