"""recllm_jax: JAX-native training of LLM recommenders (RecLLM-R1: SFT, then GRPO)."""

from recllm_jax.hf_io import export_hf, load_hf_model
from recllm_jax.models import KVCache, Qwen2Config, Qwen2ForCausalLM

__all__ = ["KVCache", "Qwen2Config", "Qwen2ForCausalLM", "export_hf", "load_hf_model"]


def __getattr__(name):
  # `generate` pulls in the decoding stack; import it lazily so `import recllm_jax` stays light.
  if name in ("generate", "beam_search"):
    from recllm_jax import generate as _generate_module
    return getattr(_generate_module, name)
  raise AttributeError(f"module 'recllm_jax' has no attribute {name!r}")
