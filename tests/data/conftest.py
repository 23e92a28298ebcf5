"""Tiny hand-written datasets and shared fixtures for the data tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import pytest

CATALOG_ROWS = [
  {"item_id": "A", "title": "Acme Gel Pen, Blue, 12-Pack", "brand": "Acme", "category": "Pens"},
  {"item_id": "B", "title": "Acme Spiral Notebook", "brand": "Acme", "category": "Notebooks"},
  {"item_id": "C", "title": "Orbit Stapler", "brand": "Orbit", "category": "Staplers"},
  {"item_id": "D", "title": "Orbit Staples", "brand": "Orbit", "category": "Staples"},
  {"item_id": "E", "title": "Orbit Staples", "brand": "Orbit", "category": "Staples"},
]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
  """Rows may be dicts (serialised) or raw strings (written verbatim, for broken lines)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return path


def make_jsonl_dataset(
  root: Path,
  interactions: Iterable[dict[str, Any] | str],
  catalog: Iterable[dict[str, Any] | str] = CATALOG_ROWS,
) -> Path:
  write_jsonl(root / "catalog.jsonl", catalog)
  write_jsonl(root / "interactions.jsonl", interactions)
  return root


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

  from recllm_jax.data.sources import read_jsonl
  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  catalog = read_jsonl(synthetic_dir).catalog
  texts = [item.title for item in catalog] + [str(item.attributes["description"]) for item in catalog]
  out = tmp_path_factory.mktemp("tokenizer")
  train_bpe_tokenizer(texts, out, vocab_size=1024)
  return transformers.AutoTokenizer.from_pretrained(out)
