"""Tiny hand-written datasets for the data tests (a plain module so tests can import it)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
