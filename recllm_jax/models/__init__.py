"""Model definitions."""
from recllm_jax.models.config import ConfigError, Qwen2Config, PRESETS
from recllm_jax.models.qwen2 import KVCache, Qwen2ForCausalLM, count_params
from recllm_jax.models.vocab import grow_vocab, padded_vocab_size, vocab_size_for

__all__ = ["ConfigError", "KVCache", "PRESETS", "Qwen2Config", "Qwen2ForCausalLM", "count_params",
           "grow_vocab", "padded_vocab_size", "vocab_size_for"]
