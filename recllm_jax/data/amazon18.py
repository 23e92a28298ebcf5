"""Reader for the D3/MiniOneRec preprocessing of Amazon Reviews 2018.

The published files are ``items.json``, ``valid.csv`` and ``test.csv``;
there is no training file, so training examples are rebuilt from
``valid.csv`` without letting any evaluation target leak into them (see
:func:`read_amazon18` and ``docs/data.md``).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError
from recllm_jax.data.reader_utils import (
  BadRows,
  check_limits,
  example_at,
  filter_examples,
  require_file,
  require_nonempty,
)
from recllm_jax.data.schema import Example, RecDataset

__all__ = ["INFO_FILE", "ITEMS_FILE", "TEST_FILE", "VALID_FILE", "read_amazon18"]

ITEMS_FILE = "items.json"
VALID_FILE = "valid.csv"
TEST_FILE = "test.csv"
INFO_FILE = "info.txt"  # optional: the published semantic IDs
VALID_HOLDOUTS = ("last_row", "users")


def _read_items(path: Path) -> Catalog:
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
    description = _description(meta.get("description"))
    if description:
      attributes["description"] = description
    catalog.add(Item(item_id=str(item_id), title=meta["title"], attributes=attributes))
  return catalog


def _read_info_sids(path: Path, catalog: Catalog) -> None:
  """The published semantic IDs (``<sid>\t<title>\t<item_id>`` per line) into each item's
  ``sid`` attribute, where ``data.item_format='sid'`` finds them."""
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 3:
        raise DataError(f"expected 3 tab-separated fields (sid, title, item_id), got {len(fields)}",
                        path=path, line=line_no)
      item_id = fields[-1].strip()
      if item_id not in catalog:
        raise DataError(f"item {item_id!r} is not in {ITEMS_FILE}", path=path, line=line_no,
                        item_id=item_id)
      catalog[item_id].attributes["sid"] = fields[0].strip()


def _description(value: Any) -> str:
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
class _CsvRow:
  user_id: str
  history: tuple[str, ...]
  target: str


def _read_csv(path: Path, catalog: Catalog, bad: BadRows) -> list[_CsvRow]:
  rows: list[_CsvRow] = []
  with path.open("r", encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    try:
      missing = {"user_id", "history_item_id", "item_id"} - set(reader.fieldnames or ())
      if missing:
        raise DataError(f"missing columns {sorted(missing)}", path=path, line=1)
      for record in reader:
        try:
          rows.append(_parse_record(record, catalog, path, reader.line_num))
        except DataError as e:
          bad.handle(e)
    except UnicodeDecodeError as e:  # the csv module reads in chunks, so only the file is known
      raise DataError(f"invalid UTF-8 ({e.reason})", path=path) from None
    except csv.Error as e:
      raise DataError(f"malformed CSV: {e}", path=path, line=reader.line_num) from None
  return rows


def _parse_record(record: Mapping[str, str | None], catalog: Catalog, path: Path, line: int) -> _CsvRow:
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
  return _CsvRow(user_id, history_ids, target)


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
  valid_holdout: str = "last_row",
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

  ``valid_holdout``: ``"last_row"`` trains on the held-out users' earlier rows (their valid
  row's history is then a sequence seen in training); ``"users"`` holds those users out
  entirely, which is what test rows look like (histories never trained on), so it is the split
  to choose settings on for models that can memorise users.
  """
  check_limits(min_history, max_history)
  if valid_holdout not in VALID_HOLDOUTS:
    raise ValueError(f"valid_holdout must be one of {VALID_HOLDOUTS}, got {valid_holdout!r}")
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
  root = Path(data_dir)
  items_path, valid_path, test_path = root / ITEMS_FILE, root / VALID_FILE, root / TEST_FILE
  for p in (items_path, valid_path, test_path):
    require_file(p)
  bad = BadRows(on_bad_data)
  catalog = _read_items(items_path)
  if (root / INFO_FILE).is_file():
    _read_info_sids(root / INFO_FILE, catalog)
  valid_rows = _read_csv(valid_path, catalog, bad)
  test_rows = _read_csv(test_path, catalog, bad)

  last_row: dict[str, _CsvRow] = {}
  for row in valid_rows:
    last_row[row.user_id] = row
  held_out = {u: r for u, r in last_row.items() if _holds_out(u, valid_fraction)}
  held_keys = {(r.user_id, r.history, r.target) for r in held_out.values()}

  train: list[Example] = []
  seen: set[tuple[str, tuple[str, ...], str]] = set(held_keys)
  for row in valid_rows:
    if valid_holdout == "users" and row.user_id in held_out:
      continue  # the held-out users' sequences are never trained on
    sequence = row.history + (row.target,)
    for t in range(min_history, len(sequence)):
      ex = example_at(row.user_id, sequence, t)
      key = (ex.user_id, ex.history, ex.targets[0])
      if key not in seen:
        seen.add(key)
        train.append(ex)

  def as_example(r: _CsvRow) -> Example:
    return Example(user_id=r.user_id, history=r.history, targets=(r.target,))

  dataset = RecDataset(
    catalog=catalog,
    train=filter_examples(train, min_history, max_history),
    valid=filter_examples([as_example(r) for r in held_out.values()], min_history, max_history),
    test=filter_examples([as_example(r) for r in test_rows], min_history, max_history),
    skipped=bad.skipped,
  )
  require_nonempty(dataset.train, "train", valid_path, bad.skipped)
  return dataset
