"""The in-memory form every reader produces: :class:`Example` and :class:`RecDataset`.

Kept apart from the readers so that code consuming examples (prompts, the
pipeline, the synthetic generator's file names) depends on the data model
only, never on a particular on-disk format. It imports nothing from the
package but :mod:`recllm_jax.data.catalog`, which imports nothing back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from recllm_jax.data.catalog import Catalog

__all__ = [
  "CATALOG_FILE",
  "CATALOG_PARQUET",
  "Example",
  "INTERACTIONS_FILE",
  "INTERACTIONS_PARQUET",
  "RecDataset",
  "SPLITS",
  "drop_history_items",
  "user_sequences",
]

SPLITS = ("train", "valid", "test")

# The user-data ("jsonl") format: two tables, each as JSON Lines or Parquet.
CATALOG_FILE = "catalog.jsonl"
INTERACTIONS_FILE = "interactions.jsonl"
CATALOG_PARQUET = "catalog.parquet"
INTERACTIONS_PARQUET = "interactions.parquet"


@dataclasses.dataclass(frozen=True)
class Example:
  """One recommendation instance: a user's past items and what came next.

  ``timestamps`` and ``actions`` are optional and, when present, aligned
  with ``history`` (they describe history events only, never targets, so a
  prompt cannot leak when the target happened).
  """

  user_id: str
  history: tuple[str, ...]
  targets: tuple[str, ...]
  profile: Mapping[str, Any] | None = None
  timestamps: tuple[int, ...] | None = None
  actions: tuple[str, ...] | None = None

  def __post_init__(self) -> None:
    if not self.targets:
      raise ValueError(f"example for user {self.user_id!r} has no targets")
    for name in ("timestamps", "actions"):
      aligned = getattr(self, name)
      if aligned is not None and len(aligned) != len(self.history):
        raise ValueError(
          f"example for user {self.user_id!r}: {name} has {len(aligned)} "
          f"entries but history has {len(self.history)}"
        )

  def truncated(self, max_history: int | None) -> Example:
    """Keep only the newest ``max_history`` history events (``None``: all)."""
    if max_history is None or len(self.history) <= max_history:
      return self
    cut = len(self.history) - max_history
    return dataclasses.replace(
      self,
      history=self.history[cut:],
      timestamps=None if self.timestamps is None else self.timestamps[cut:],
      actions=None if self.actions is None else self.actions[cut:],
    )


@dataclasses.dataclass
class RecDataset:
  """A catalog plus leakage-free train/valid/test example lists."""

  catalog: Catalog
  train: list[Example]
  valid: list[Example]
  test: list[Example]
  skipped: int = 0

  def split(self, name: str) -> list[Example]:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return getattr(self, name)

  def __repr__(self) -> str:
    return (
      f"RecDataset({self.catalog!r}, train={len(self.train)}, valid={len(self.valid)}, "
      f"test={len(self.test)}, skipped={self.skipped})"
    )


def user_sequences(examples: list[Example]) -> list[Example]:
  """The examples that are not a prefix of another example of the same user, in input order.

  Training examples rebuilt from sliding windows repeat each user's sequence once per prefix
  (every prefix predicts its next item). Trained with the loss on every history item, the
  longest sequence alone teaches all of those next items, at a fraction of the tokens. An
  example is a prefix of another when its history + targets starts the other's history +
  targets; equal sequences keep their first occurrence.
  """
  by_user: dict[str, list[tuple[str, ...]]] = {}
  for ex in examples:
    by_user.setdefault(ex.user_id, []).append(ex.history + ex.targets)
  kept, seen = [], set()
  for ex in examples:
    seq = ex.history + ex.targets
    longer = any(len(other) > len(seq) and other[:len(seq)] == seq for other in by_user[ex.user_id])
    if not longer and (ex.user_id, seq) not in seen:
      seen.add((ex.user_id, seq))
      kept.append(ex)
  return kept


def drop_history_items(example: Example, rng: np.random.Generator, rate: float) -> Example:
  """`example` with each history item dropped independently with probability `rate`.

  A training-time augmentation for small data: every epoch shows a user's sequence with other
  gaps, so the model also learns to predict across a skipped item instead of memorising one
  context per user. The targets and at least one history item are always kept (the newest,
  when everything else was dropped), and `timestamps` / `actions` stay aligned.
  """
  n = len(example.history)
  if rate <= 0.0 or n == 0:
    return example
  keep = rng.random(n) >= rate
  if not keep.any():
    keep[-1] = True
  if keep.all():
    return example

  def kept(values: tuple | None) -> tuple | None:
    return None if values is None else tuple(v for v, k in zip(values, keep) if k)

  return dataclasses.replace(example, history=kept(example.history),
                             timestamps=kept(example.timestamps), actions=kept(example.actions))
