"""What every dataset reader shares: the bad-data policy, history limits, file checks.

Each reader (:mod:`~recllm_jax.data.jsonl`, :mod:`~recllm_jax.data.amazon18`)
applies the same rules so that ``on_bad_data``, ``min_history`` and
``max_history`` mean the same thing whatever the on-disk format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recllm_jax.data.errors import DataError
from recllm_jax.data.schema import Example

__all__ = [
  "BAD_DATA_MODES",
  "BadRows",
  "check_limits",
  "example_at",
  "filter_examples",
  "require_file",
  "require_nonempty",
]

BAD_DATA_MODES = ("error", "skip")


class BadRows:
  """Applies the ``on_bad_data`` policy in one place so readers stay linear.

  With ``"error"`` the first bad row raises its :class:`DataError` (which
  names ``file:line``); with ``"skip"`` it is dropped and counted.
  """

  def __init__(self, mode: str) -> None:
    if mode not in BAD_DATA_MODES:
      raise ValueError(f"on_bad_data must be one of {BAD_DATA_MODES}, got {mode!r}")
    self.mode = mode
    self.skipped = 0

  def handle(self, error: DataError) -> None:
    if self.mode == "error":
      raise error
    self.skipped += 1


def check_limits(min_history: int, max_history: int | None) -> None:
  if min_history < 0:
    raise ValueError(f"min_history must be >= 0, got {min_history}")
  if max_history is not None and max_history < max(min_history, 1):
    raise ValueError(f"max_history={max_history} must be >= max(min_history, 1)")


def filter_examples(examples: list[Example], min_history: int, max_history: int | None) -> list[Example]:
  """Drop examples with fewer than ``min_history`` events, then cut to the newest ``max_history``."""
  return [ex.truncated(max_history) for ex in examples if len(ex.history) >= min_history]


def require_file(path: Path) -> None:
  if not path.is_file():
    raise DataError("file not found", path=path)


def require_nonempty(examples: list[Example], split: str, path: Path, skipped: int) -> None:
  if not examples:
    raise DataError(
      f"no usable {split} examples ({skipped} bad rows skipped); "
      "the dataset is empty or every row was filtered out",
      path=path,
    )


def example_at(
  user_id: str,
  sequence: Sequence[str],
  t: int,
  *,
  profile: Mapping[str, Any] | None = None,
  timestamps: Sequence[int] | None = None,
  actions: Sequence[str] | None = None,
) -> Example:
  """The example ``sequence[:t] -> sequence[t]`` with metadata sliced to the history."""
  return Example(
    user_id=user_id,
    history=tuple(sequence[:t]),
    targets=(sequence[t],),
    profile=profile,
    timestamps=None if timestamps is None else tuple(timestamps[:t]),
    actions=None if actions is None else tuple(actions[:t]),
  )
