"""Reader for users' own data: a catalog table plus an interactions table.

Each table is ``<name>.jsonl`` (JSON Lines, the format the synthetic
generator writes) or ``<name>.parquet`` (what pandas, Spark and BigQuery
exports produce; read with the Hugging Face ``datasets`` library). Both go
through the same row validation, so every bad row is reported as
``file:line`` (for Parquet, the 1-based row number) with the field or item
id at fault. The format is documented in ``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError
from recllm_jax.data.reader_utils import (
  BadRows,
  check_limits,
  example_at,
  filter_examples,
  require_nonempty,
)
from recllm_jax.data.schema import (
  CATALOG_FILE,
  CATALOG_PARQUET,
  INTERACTIONS_FILE,
  INTERACTIONS_PARQUET,
  SPLITS,
  Example,
  RecDataset,
)

__all__ = ["read_jsonl"]


# --------------------------------------------------------------------------
# Row sources
# --------------------------------------------------------------------------


def _table_path(root: Path, jsonl_name: str, parquet_name: str) -> Path:
  """The one file holding a table: ``jsonl_name`` or ``parquet_name`` under ``root``.

  Both present is an error rather than a silent preference, since the two
  would usually be different exports of the same data.
  """
  jsonl, parquet = root / jsonl_name, root / parquet_name
  if jsonl.is_file() and parquet.is_file():
    raise DataError(f"both {jsonl_name} and {parquet_name} exist; keep only one", path=root)
  if parquet.is_file():
    return parquet
  if not jsonl.is_file():
    raise DataError(f"file not found ({parquet_name} is also accepted)", path=jsonl)
  return jsonl


def _iter_rows(path: Path, bad: BadRows) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yield ``(1-based line or row number, object)`` from a JSONL or Parquet file."""
  if path.suffix == ".parquet":
    return _iter_parquet(path)
  return _iter_jsonl(path, bad)


def _iter_jsonl(path: Path, bad: BadRows) -> Iterator[tuple[int, dict[str, Any]]]:
  """Blank lines are allowed and ignored.

  Lines are decoded one at a time so that invalid UTF-8 is reported (or
  skipped) with its line number like any other bad row.
  """
  with path.open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        bad.handle(DataError(f"invalid UTF-8 at byte {e.start}", path=path, line=lineno))
        continue
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        bad.handle(DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=lineno))
        continue
      if not isinstance(obj, dict):
        bad.handle(
          DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
        )
        continue
      yield lineno, obj


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """Rows of a Parquet file as JSON-like dicts, nulls removed.

  Arrow gives every row every column and every struct every field, filling
  the gaps with nulls; dropping null-valued keys turns them back into the
  absent fields the JSONL rules expect (a user without ``split`` or a
  ``profile`` without ``occupation``). Nulls inside lists are kept, so a
  null item id is still reported as bad.
  """
  import datasets  # lazy: a ~0.5 s import that only Parquet users pay
  import pyarrow

  # A throwaway cache: datasets would otherwise copy the table into
  # ~/.cache/huggingface on every new file; keep_in_memory makes it safe to delete.
  with tempfile.TemporaryDirectory(prefix="recllm-parquet-") as cache_dir:
    try:
      table = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True)
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, OSError) as e:
      raise DataError(f"unreadable Parquet file ({e})", path=path) from None
  for row_number, row in enumerate(table, start=1):
    yield row_number, _drop_nulls(row)


def _drop_nulls(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


class _Row:
  """Typed field access for one JSON object, raising ``DataError(file:line)``."""

  def __init__(self, obj: Mapping[str, Any], path: Path, line: int) -> None:
    self.obj, self.path, self.line = obj, path, line

  def error(self, message: str, field: str | None = None, item_id: str | None = None) -> DataError:
    return DataError(message, path=self.path, line=self.line, field=field, item_id=item_id)

  def require(self, field: str) -> Any:
    if field not in self.obj:
      raise self.error(f"missing required field {field!r}", field=field)
    return self.obj[field]

  def identifier(self, value: Any, field: str) -> str:
    """Ids may be JSON strings or integers (common in exported data); stored as str."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
      raise self.error(
        f"field {field!r} must be a string id, got {type(value).__name__}", field=field
      )
    value = str(value)
    if not value:
      raise self.error(f"field {field!r} must be a non-empty id", field=field)
    return value


# --------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------


def _parse_catalog(path: Path, bad: BadRows) -> Catalog:
  catalog = Catalog()
  for lineno, obj in _iter_rows(path, bad):
    row = _Row(obj, path, lineno)
    try:
      item_id = row.identifier(row.require("item_id"), "item_id")
      title = row.require("title")
      if not isinstance(title, str) or not title.strip():
        raise row.error("field 'title' must be a non-empty string", field="title")
      if item_id in catalog:
        raise row.error(f"duplicate item id {item_id!r}", field="item_id", item_id=item_id)
    except DataError as e:
      bad.handle(e)
      continue
    attributes = {k: v for k, v in obj.items() if k not in ("item_id", "title")}
    catalog.add(Item(item_id=item_id, title=title, attributes=attributes))
  if not len(catalog):
    raise DataError(f"no usable items ({bad.skipped} bad rows skipped)", path=path)
  return catalog


# --------------------------------------------------------------------------
# Interactions
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Events:
  """Parsed interaction entries: ids plus per-entry optional metadata."""

  ids: list[str]
  timestamps: list[int | None]
  actions: list[str | None]

  def __add__(self, other: _Events) -> _Events:
    return _Events(self.ids + other.ids, self.timestamps + other.timestamps, self.actions + other.actions)

  def aligned(self, row: _Row, field: str) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """Timestamps/actions as aligned tuples, or ``None`` when absent.

    All-or-nothing: a partially annotated sequence is almost always an
    export bug, so it is reported rather than silently dropped.
    """
    out: list[tuple[Any, ...] | None] = []
    for name, values in (("timestamp", self.timestamps), ("action", self.actions)):
      present = sum(v is not None for v in values)
      if present and present != len(values):
        raise row.error(f"field {field!r}: {name!r} given for some entries but not all", field=field)
      out.append(tuple(values) if present else None)
    return out[0], out[1]  # type: ignore[return-value]


def _parse_events(row: _Row, value: Any, field: str, catalog: Catalog) -> _Events:
  """Entries are item ids or ``{"item_id", "timestamp"?, "action"?}`` objects."""
  if not isinstance(value, list):
    raise row.error(f"field {field!r} must be a list, got {type(value).__name__}", field=field)
  events = _Events([], [], [])
  for pos, entry in enumerate(value):
    where = f"{field}[{pos}]"
    ts: Any = None
    action: Any = None
    if isinstance(entry, dict):
      item_id = row.identifier(entry.get("item_id"), f"{where}.item_id")
      ts, action = entry.get("timestamp"), entry.get("action")
      if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
        raise row.error(f"field '{where}.timestamp' must be a number", field=field)
      if action is not None and not isinstance(action, str):
        raise row.error(f"field '{where}.action' must be a string", field=field)
    else:
      item_id = row.identifier(entry, where)
    if item_id not in catalog:
      raise row.error(f"unknown item id {item_id!r} in field {field!r}", field=field, item_id=item_id)
    events.ids.append(item_id)
    events.timestamps.append(None if ts is None else int(ts))
    events.actions.append(action)
  return events


def _interaction_examples(
  row: _Row, catalog: Catalog, sequence_line: dict[str, int], min_history: int
) -> list[tuple[str, list[Example]]]:
  """Validate one interactions row and expand it into per-split examples."""
  user_id = row.identifier(row.require("user_id"), "user_id")
  profile = row.obj.get("profile")
  if profile is not None and not isinstance(profile, dict):
    raise row.error(f"field 'profile' must be an object, got {type(profile).__name__}", field="profile")
  history = _parse_events(row, row.require("history"), "history", catalog)
  split = row.obj.get("split")

  if split is not None:
    if split not in SPLITS:
      raise row.error(f"field 'split' must be one of {SPLITS}, got {split!r}", field="split")
    targets = _parse_events(row, row.require("targets"), "targets", catalog)
    if not targets.ids:
      raise row.error("field 'targets' must not be empty", field="targets")
    if not history.ids and min_history > 0:  # dropped silently, it would shrink an evaluation
      raise row.error("field 'history' is empty: an example needs at least one item the user "
                      "interacted with (min_history=0 keeps cold-start rows)", field="history")
    timestamps, actions = history.aligned(row, "history")
    example = Example(user_id, tuple(history.ids), tuple(targets.ids), profile, timestamps, actions)
    return [(split, [example])]

  if user_id in sequence_line:
    raise row.error(
      f"user {user_id!r} already has an unsplit sequence at line {sequence_line[user_id]}; "
      "give one sequence per user or set 'split' on every row",
      field="user_id",
    )
  sequence_line[user_id] = row.line
  sequence = history + _parse_events(row, row.obj.get("targets", []), "targets", catalog)
  timestamps, actions = sequence.aligned(row, "history")
  n = len(sequence.ids)

  def at(t: int) -> list[Example]:
    if t < min_history:
      return []
    return [example_at(user_id, sequence.ids, t, profile=profile, timestamps=timestamps, actions=actions)]

  # Leave-last-out: positions n-1 (test) and n-2 (valid) are only ever targets of their own split.
  return [
    ("train", [ex for t in range(n - 2) for ex in at(t)]),
    ("valid", at(n - 2)),
    ("test", at(n - 1)),
  ]


def read_jsonl(
  data_dir: str | os.PathLike[str],
  *,
  on_bad_data: str = "error",
  min_history: int = 1,
  max_history: int | None = None,
) -> RecDataset:
  """Read ``catalog.{jsonl,parquet}`` + ``interactions.{jsonl,parquet}`` (format in ``docs/data.md``).

  Rows with ``"split"`` are used as given. Rows without it are a user's
  whole chronological sequence (``history + targets``) and are split
  leave-last-out: last item -> test, second-to-last -> valid, every earlier
  prefix -> train, so evaluation targets never appear in training targets
  or histories of the same user.
  """
  check_limits(min_history, max_history)
  root = Path(data_dir)
  catalog_path = _table_path(root, CATALOG_FILE, CATALOG_PARQUET)
  inter_path = _table_path(root, INTERACTIONS_FILE, INTERACTIONS_PARQUET)
  bad = BadRows(on_bad_data)
  catalog = _parse_catalog(catalog_path, bad)

  splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
  sequence_line: dict[str, int] = {}  # user -> line of their unsplit sequence
  for lineno, obj in _iter_rows(inter_path, bad):
    row = _Row(obj, inter_path, lineno)
    try:
      produced = _interaction_examples(row, catalog, sequence_line, min_history)
    except DataError as e:
      bad.handle(e)
      continue
    for split, examples in produced:
      splits[split].extend(examples)

  dataset = RecDataset(
    catalog=catalog,
    **{s: filter_examples(splits[s], min_history, max_history) for s in SPLITS},
    skipped=bad.skipped,
  )
  require_nonempty(dataset.train, "train", inter_path, bad.skipped)
  return dataset
