"""Readers that turn recommendation data on disk into :class:`RecDataset`.

Two on-disk formats are supported (see ``docs/data.md``):

* ``jsonl``: ``catalog.jsonl`` + ``interactions.jsonl``, the format for users'
  own data and the one the synthetic generator writes;
* ``amazon18``: the D3/MiniOneRec preprocessing of Amazon Reviews 2018
  (``items.json``, ``valid.csv``, ``test.csv``).

Every reader follows the same bad-data policy: with ``on_bad_data="error"``
the first malformed row raises :class:`DataError` naming ``file:line``; with
``"skip"`` the row is dropped and counted in :attr:`RecDataset.skipped`.
Splits are built so that no evaluation target is ever visible in training.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError

__all__ = [
  "CATALOG_FILE",
  "Example",
  "FORMATS",
  "INTERACTIONS_FILE",
  "RecDataset",
  "SPLITS",
  "detect_format",
  "load_dataset",
  "read_amazon18",
  "read_jsonl",
]

FORMATS = ("auto", "jsonl", "amazon18", "synthetic")
SPLITS = ("train", "valid", "test")
_BAD_DATA_MODES = ("error", "skip")

CATALOG_FILE = "catalog.jsonl"
INTERACTIONS_FILE = "interactions.jsonl"


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


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


class _BadRows:
  """Applies the ``on_bad_data`` policy in one place so readers stay linear."""

  def __init__(self, mode: str) -> None:
    if mode not in _BAD_DATA_MODES:
      raise ValueError(f"on_bad_data must be one of {_BAD_DATA_MODES}, got {mode!r}")
    self.mode = mode
    self.skipped = 0

  def handle(self, error: DataError) -> None:
    if self.mode == "error":
      raise error
    self.skipped += 1


def _filter_examples(examples: list[Example], min_history: int, max_history: int | None) -> list[Example]:
  return [ex.truncated(max_history) for ex in examples if len(ex.history) >= min_history]


def _check_limits(min_history: int, max_history: int | None) -> None:
  if min_history < 0:
    raise ValueError(f"min_history must be >= 0, got {min_history}")
  if max_history is not None and max_history < max(min_history, 1):
    raise ValueError(f"max_history={max_history} must be >= max(min_history, 1)")


def _require_file(path: Path) -> None:
  if not path.is_file():
    raise DataError("file not found", path=path)


def _require_nonempty(examples: list[Example], split: str, path: Path, skipped: int) -> None:
  if not examples:
    raise DataError(
      f"no usable {split} examples ({skipped} bad rows skipped); "
      "the dataset is empty or every row was filtered out",
      path=path,
    )


def _example_at(
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


# --------------------------------------------------------------------------
# JSONL format
# --------------------------------------------------------------------------


def _iter_jsonl(path: Path, bad: _BadRows) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yield ``(1-based line, object)``; blank lines are allowed and ignored.

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


def _parse_catalog(path: Path, bad: _BadRows) -> Catalog:
  catalog = Catalog()
  for lineno, obj in _iter_jsonl(path, bad):
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


def read_jsonl(
  data_dir: str | os.PathLike[str],
  *,
  on_bad_data: str = "error",
  min_history: int = 1,
  max_history: int | None = None,
) -> RecDataset:
  """Read ``catalog.jsonl`` + ``interactions.jsonl`` (format in ``docs/data.md``).

  Rows with ``"split"`` are used as given. Rows without it are a user's
  whole chronological sequence (``history + targets``) and are split
  leave-last-out: last item -> test, second-to-last -> valid, every earlier
  prefix -> train, so evaluation targets never appear in training targets
  or histories of the same user.
  """
  _check_limits(min_history, max_history)
  root = Path(data_dir)
  catalog_path, inter_path = root / CATALOG_FILE, root / INTERACTIONS_FILE
  _require_file(catalog_path)
  _require_file(inter_path)
  bad = _BadRows(on_bad_data)
  catalog = _parse_catalog(catalog_path, bad)

  splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
  sequence_line: dict[str, int] = {}  # user -> line of their unsplit sequence
  for lineno, obj in _iter_jsonl(inter_path, bad):
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
    **{s: _filter_examples(splits[s], min_history, max_history) for s in SPLITS},
    skipped=bad.skipped,
  )
  _require_nonempty(dataset.train, "train", inter_path, bad.skipped)
  return dataset


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
    return [_example_at(user_id, sequence.ids, t, profile=profile, timestamps=timestamps, actions=actions)]

  # Leave-last-out: positions n-1 (test) and n-2 (valid) are only ever targets of their own split.
  return [
    ("train", [ex for t in range(n - 2) for ex in at(t)]),
    ("valid", at(n - 2)),
    ("test", at(n - 1)),
  ]


# --------------------------------------------------------------------------
# Amazon 2018 (D3 / MiniOneRec preprocessing)
# --------------------------------------------------------------------------


def _read_amazon_items(path: Path) -> Catalog:
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"malformed JSON: {e.msg}", path=path, line=e.lineno) from e
  if not isinstance(raw, dict) or not raw:
    raise DataError("expected a non-empty JSON object of items", path=path)
  catalog = Catalog()
  for item_id, meta in raw.items():
    if not isinstance(meta, dict) or not isinstance(meta.get("title"), str):
      raise DataError(f"item {item_id!r} has no string 'title'", path=path, item_id=item_id)
    attributes: dict[str, Any] = {}
    for key in ("brand", "categories"):
      if meta.get(key):
        attributes[key] = meta[key]
    description = _amazon_description(meta.get("description"))
    if description:
      attributes["description"] = description
    catalog.add(Item(item_id=str(item_id), title=meta["title"], attributes=attributes))
  return catalog


def _amazon_description(value: Any) -> str:
  """Descriptions are stored as Python-literal lists of strings; join the non-empty parts."""
  if not isinstance(value, str):
    return ""
  try:
    parts = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value.strip()
  if isinstance(parts, (list, tuple)):
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
  return str(parts).strip()


@dataclasses.dataclass(frozen=True)
class _AmazonRow:
  user_id: str
  history: tuple[str, ...]
  target: str


def _read_amazon_csv(path: Path, catalog: Catalog, bad: _BadRows) -> list[_AmazonRow]:
  rows: list[_AmazonRow] = []
  with path.open("r", encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    try:
      missing = {"user_id", "history_item_id", "item_id"} - set(reader.fieldnames or ())
      if missing:
        raise DataError(f"missing columns {sorted(missing)}", path=path, line=1)
      for record in reader:
        try:
          rows.append(_parse_amazon_record(record, catalog, path, reader.line_num))
        except DataError as e:
          bad.handle(e)
    except UnicodeDecodeError as e:  # the csv module reads in chunks, so only the file is known
      raise DataError(f"invalid UTF-8 ({e.reason})", path=path) from None
    except csv.Error as e:
      raise DataError(f"malformed CSV: {e}", path=path, line=reader.line_num) from None
  return rows


def _parse_amazon_record(record: Mapping[str, str | None], catalog: Catalog, path: Path, line: int) -> _AmazonRow:
  def fail(message: str, field: str, item_id: str | None = None) -> DataError:
    return DataError(message, path=path, line=line, field=field, item_id=item_id)

  user_id = (record.get("user_id") or "").strip()
  if not user_id:
    raise fail("missing value in field 'user_id'", "user_id")
  try:
    history = ast.literal_eval(record.get("history_item_id") or "")
  except (ValueError, SyntaxError) as e:
    raise fail(f"field 'history_item_id' is not a Python list literal ({e})", "history_item_id") from None
  if not isinstance(history, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in history):
    raise fail("field 'history_item_id' must be a list of integer ids", "history_item_id")
  target = (record.get("item_id") or "").strip()
  if not target.isdigit():
    raise fail(f"field 'item_id' must be an integer id, got {target!r}", "item_id")
  history_ids = tuple(str(i) for i in history)
  target = str(int(target))
  for field, ids in (("history_item_id", history_ids), ("item_id", (target,))):
    for item_id in ids:
      if item_id not in catalog:
        raise fail(f"unknown item id {item_id!r} in field {field!r}", field, item_id)
  return _AmazonRow(user_id, history_ids, target)


def _holds_out(user_id: str, fraction: float) -> bool:
  """Stable per-user coin flip (independent of file order and Python's hash seed)."""
  digest = hashlib.sha256(user_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def read_amazon18(
  data_dir: str | os.PathLike[str],
  *,
  on_bad_data: str = "error",
  min_history: int = 1,
  max_history: int | None = None,
  valid_fraction: float = 0.1,
) -> RecDataset:
  """Read the Amazon-2018 sequential split (``items.json``, ``valid.csv``, ``test.csv``).

  Only valid/test are published, so training data is rebuilt from
  ``valid.csv`` (every history prefix predicts the next item, the full
  history predicts the target), deduplicated because a user's rows are
  sliding windows of one sequence. For a stable ``valid_fraction`` of users
  the *last* ``valid.csv`` row is held out as the ``valid`` split and
  excluded from training; since it is the user's latest event in that file,
  no training example sees its target. ``test`` is ``test.csv`` verbatim
  (all of it is later in time than ``valid.csv``).
  """
  _check_limits(min_history, max_history)
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
  root = Path(data_dir)
  items_path, valid_path, test_path = root / "items.json", root / "valid.csv", root / "test.csv"
  for p in (items_path, valid_path, test_path):
    _require_file(p)
  bad = _BadRows(on_bad_data)
  catalog = _read_amazon_items(items_path)
  valid_rows = _read_amazon_csv(valid_path, catalog, bad)
  test_rows = _read_amazon_csv(test_path, catalog, bad)

  last_row: dict[str, _AmazonRow] = {}
  for row in valid_rows:
    last_row[row.user_id] = row
  held_out = {u: r for u, r in last_row.items() if _holds_out(u, valid_fraction)}
  held_keys = {(r.user_id, r.history, r.target) for r in held_out.values()}

  train: list[Example] = []
  seen: set[tuple[str, tuple[str, ...], str]] = set(held_keys)
  for row in valid_rows:
    sequence = row.history + (row.target,)
    for t in range(min_history, len(sequence)):
      ex = _example_at(row.user_id, sequence, t)
      key = (ex.user_id, ex.history, ex.targets[0])
      if key not in seen:
        seen.add(key)
        train.append(ex)

  def as_example(r: _AmazonRow) -> Example:
    return Example(user_id=r.user_id, history=r.history, targets=(r.target,))

  dataset = RecDataset(
    catalog=catalog,
    train=_filter_examples(train, min_history, max_history),
    valid=_filter_examples([as_example(r) for r in held_out.values()], min_history, max_history),
    test=_filter_examples([as_example(r) for r in test_rows], min_history, max_history),
    skipped=bad.skipped,
  )
  _require_nonempty(dataset.train, "train", valid_path, bad.skipped)
  return dataset


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def detect_format(data_dir: str | os.PathLike[str]) -> str:
  """Guess the format from the files present; raises if nothing matches."""
  root = Path(data_dir)
  if (root / CATALOG_FILE).is_file():
    return "jsonl"
  if (root / "items.json").is_file() and (root / "valid.csv").is_file():
    return "amazon18"
  raise DataError(
    f"no dataset found: expected {CATALOG_FILE}+{INTERACTIONS_FILE} (jsonl) or "
    "items.json+valid.csv+test.csv (amazon18); use fmt='synthetic' to generate one",
    path=root,
  )


def load_dataset(
  data_dir: str | os.PathLike[str],
  fmt: str = "auto",
  *,
  on_bad_data: str = "error",
  min_history: int = 1,
  max_history: int | None = None,
  valid_fraction: float = 0.1,
  seed: int = 0,
) -> RecDataset:
  """Load a dataset directory in any supported format.

  ``fmt="synthetic"`` generates the offline default dataset into
  ``data_dir`` (with ``seed``) when the directory is missing or empty, then
  reads it as JSONL, so configs can point at a cache directory and get the
  same data on every host. ``valid_fraction`` only affects ``amazon18``.
  ``min_history`` drops examples with shorter histories from every split;
  ``max_history`` keeps only the newest events of each history.
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  root = Path(data_dir)
  if fmt == "synthetic":
    from recllm_jax.data import synthetic

    if not (root / CATALOG_FILE).is_file():
      foreign = [
        p.name
        for p in (root.iterdir() if root.is_dir() else ())
        if p.name not in synthetic.SYNTHETIC_FILES and not p.name.startswith(synthetic.TMP_PREFIX)
      ]
      if foreign:
        raise DataError(
          f"directory has no {CATALOG_FILE} but other files ({', '.join(sorted(foreign)[:3])}); "
          "refusing to generate synthetic data into it",
          path=root,
        )
      synthetic.generate_synthetic(root, seed=seed)
    fmt = "jsonl"
  elif fmt == "auto":
    fmt = detect_format(root)

  if fmt == "amazon18":
    return read_amazon18(
      root,
      on_bad_data=on_bad_data,
      min_history=min_history,
      max_history=max_history,
      valid_fraction=valid_fraction,
    )
  return read_jsonl(root, on_bad_data=on_bad_data, min_history=min_history, max_history=max_history)
