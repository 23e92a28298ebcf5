"""Shared fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from sample_data import CATALOG_ROWS, make_jsonl_dataset


@pytest.fixture
def jsonl_dataset(tmp_path: Path) -> Callable[..., Path]:
  """Factory: `root = jsonl_dataset(interactions, catalog=CATALOG_ROWS)` in a fresh directory."""
  counter = iter(range(1_000_000))

  def make(interactions, catalog=CATALOG_ROWS) -> Path:
    return make_jsonl_dataset(tmp_path / f"ds{next(counter)}", interactions, catalog)

  return make


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
  from recllm_jax.data.synthetic import generate_synthetic

  return generate_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, synthetic_dir):
  """A small BPE trained on the synthetic catalog (and reloaded, as users would)."""
  import transformers

  from recllm_jax.data.jsonl import read_jsonl
  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  catalog = read_jsonl(synthetic_dir).catalog
  texts = [item.title for item in catalog] + [str(item.attributes["description"]) for item in catalog]
  out = tmp_path_factory.mktemp("tokenizer")
  train_bpe_tokenizer(texts, out, vocab_size=1024)
  return transformers.AutoTokenizer.from_pretrained(out)
