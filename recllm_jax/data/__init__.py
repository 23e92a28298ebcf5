"""Recommendation data: catalogs, dataset readers, synthetic data, tokenizer, prompts.

Modules, lowest layer first (each imports only modules above it in this list):
``errors`` and ``catalog``; ``schema`` (``Example``, ``RecDataset``, file
names); ``reader_utils``; one module per format (``jsonl``, ``amazon18``) and
``synthetic``; ``loading`` (``load_dataset``, ``detect_format``); then
``tokenizer`` (``encode_prompt``; it imports ``transformers`` only inside
``train_bpe_tokenizer``), ``prompts`` and the Grain ``pipeline``.
"""

from recllm_jax.data.amazon18 import read_amazon18
from recllm_jax.data.catalog import Catalog, Item, normalize_title, popularity
from recllm_jax.data.errors import DataError
from recllm_jax.data.jsonl import read_jsonl
from recllm_jax.data.loading import detect_format, load_dataset
from recllm_jax.data.prompts import (
  PromptConfig,
  build_prompt,
  build_rationale,
  build_sft_pair,
  build_target,
  count_tokens,
  extract_titles,
  render_history,
)
from recllm_jax.data.schema import Example, RecDataset
from recllm_jax.data.synthetic import generate_synthetic

__all__ = [
  "Catalog",
  "DataError",
  "Example",
  "Item",
  "PromptConfig",
  "RecDataset",
  "build_prompt",
  "build_rationale",
  "build_sft_pair",
  "build_target",
  "count_tokens",
  "detect_format",
  "extract_titles",
  "generate_synthetic",
  "load_dataset",
  "normalize_title",
  "popularity",
  "read_amazon18",
  "read_jsonl",
  "render_history",
  "train_bpe_tokenizer",
]


def __getattr__(name: str):  # PEP 562: keep `import recllm_jax.data` free of transformers
  if name == "train_bpe_tokenizer":
    from recllm_jax.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
