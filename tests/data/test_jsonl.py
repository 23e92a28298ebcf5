"""JSONL/Parquet reader: leave-last-out splitting, explicit splits, bad-data handling."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recllm_jax.data import DataError, Example, read_jsonl

from sample_data import CATALOG_ROWS, write_jsonl


def test_leave_last_out_split(jsonl_dataset):
  root = jsonl_dataset([
    {"user_id": "u1", "profile": {"age_band": "25-34"}, "history": ["A", "B", "C", "D", "E"]},
  ])
  ds = read_jsonl(root)
  profile = {"age_band": "25-34"}
  assert ds.test == [Example("u1", ("A", "B", "C", "D"), ("E",), profile)]
  assert ds.valid == [Example("u1", ("A", "B", "C"), ("D",), profile)]
  assert ds.train == [
    Example("u1", ("A",), ("B",), profile),
    Example("u1", ("A", "B"), ("C",), profile),
  ]
  # No leakage: neither held-out target is a train target or in a train history.
  train_items = {i for ex in ds.train for i in ex.history + ex.targets}
  assert "D" not in train_items and "E" not in train_items
  assert len(ds.catalog) == 5 and ds.skipped == 0


def test_unsplit_targets_extend_the_sequence_and_metadata_is_sliced(jsonl_dataset):
  root = jsonl_dataset([{
    "user_id": 7,  # integer ids are accepted and stored as strings
    "history": [
      {"item_id": "A", "timestamp": 10, "action": "view"},
      {"item_id": "B", "timestamp": 20, "action": "purchase"},
      {"item_id": "C", "timestamp": 30, "action": "purchase"},
    ],
    "targets": [{"item_id": "D", "timestamp": 40, "action": "purchase"}],
  }])
  ds = read_jsonl(root)
  assert ds.test == [Example("7", ("A", "B", "C"), ("D",), None, (10, 20, 30), ("view", "purchase", "purchase"))]
  assert ds.valid == [Example("7", ("A", "B"), ("C",), None, (10, 20), ("view", "purchase"))]
  assert ds.train == [Example("7", ("A",), ("B",), None, (10,), ("view",))]


def test_explicit_splits_are_used_verbatim(jsonl_dataset):
  root = jsonl_dataset([
    {"user_id": "u1", "history": ["A"], "targets": ["B", "C"], "split": "train"},
    {"user_id": "u1", "history": ["A", "B", "C"], "targets": ["D"], "split": "valid"},
    {"user_id": "u2", "history": ["C"], "targets": ["D"], "split": "test"},
    {"user_id": "u2", "history": ["C"], "targets": ["E"], "split": "train"},
  ])
  ds = read_jsonl(root)
  assert [ex.targets for ex in ds.train] == [("B", "C"), ("E",)]
  assert ds.valid == [Example("u1", ("A", "B", "C"), ("D",))]
  assert ds.test == [Example("u2", ("C",), ("D",))]


def test_min_and_max_history(jsonl_dataset):
  root = jsonl_dataset([{"user_id": "u", "history": ["A", "B", "C", "D", "E"]}])
  ds = read_jsonl(root, min_history=2, max_history=2)
  assert [ex.history for ex in ds.train] == [("A", "B")]
  assert [ex.history for ex in ds.valid] == [("B", "C")]
  assert [ex.history for ex in ds.test] == [("C", "D")]
  cold = read_jsonl(root, min_history=0)
  assert cold.train[0] == Example("u", (), ("A",))


def test_blank_lines_and_extra_catalog_attributes(jsonl_dataset):
  root = jsonl_dataset(["", json.dumps({"user_id": "u", "history": ["A", "B", "C", "D"]}), "   "])
  ds = read_jsonl(root)
  assert ds.catalog["A"].attributes == {"brand": "Acme", "category": "Pens"}
  assert len(ds.train) == 1


def test_catalog_lookup_of_duplicate_titles(jsonl_dataset):
  ds = read_jsonl(jsonl_dataset([GOOD]))
  assert ds.catalog.ids_for_title("Orbit  Staples ") == ["D", "E"]


def _error(root: Path, **kwargs) -> str:
  with pytest.raises(DataError) as info:
    read_jsonl(root, **kwargs)
  return str(info.value)


GOOD = {"user_id": "u", "history": ["A", "B", "C", "D"]}


def test_malformed_json_names_file_and_line(jsonl_dataset):
  root = jsonl_dataset([GOOD, '{"user_id": "v", "history": ["A",'])
  message = _error(root)
  assert message.startswith(f"{root / 'interactions.jsonl'}:2: malformed JSON")


def test_unknown_item_id(jsonl_dataset):
  root = jsonl_dataset([GOOD, GOOD | {"user_id": "v"}, {"user_id": "w", "history": ["A", "B00X"]}])
  assert _error(root) == f"{root / 'interactions.jsonl'}:3: unknown item id 'B00X' in field 'history'"


def test_unknown_target_id(jsonl_dataset):
  root = jsonl_dataset([{"user_id": "w", "history": ["A"], "targets": ["Z"], "split": "train"}])
  assert _error(root).endswith(":1: unknown item id 'Z' in field 'targets'")


@pytest.mark.parametrize(
  "row, expected",
  [
    ({"history": ["A", "B"]}, ":1: missing required field 'user_id'"),
    ({"user_id": "u"}, ":1: missing required field 'history'"),
    ({"user_id": "u", "history": ["A"], "split": "test"}, ":1: missing required field 'targets'"),
    ({"user_id": "u", "history": "A B"}, ":1: field 'history' must be a list, got str"),
    ({"user_id": "u", "history": ["A", 1.5]}, ":1: field 'history[1]' must be a string id, got float"),
    ({"user_id": ["u"], "history": ["A"]}, ":1: field 'user_id' must be a string id, got list"),
    ({"user_id": "u", "history": ["A"], "profile": "x"}, ":1: field 'profile' must be an object, got str"),
    ({"user_id": "u", "history": ["A"], "targets": ["B"], "split": "dev"}, ":1: field 'split' must be one of"),
    ({"user_id": "u", "history": ["A"], "targets": [], "split": "train"}, ":1: field 'targets' must not be empty"),
    # An empty history in a split row (e.g. a test row scripts/evaluate.py would score) was dropped
    # without a word by the min_history filter.
    ({"user_id": "u", "history": [], "targets": ["B"], "split": "test"}, ":1: field 'history' is empty"),
    (
      {"user_id": "u", "history": [{"item_id": "A", "timestamp": 1}, {"item_id": "B"}]},
      ":1: field 'history': 'timestamp' given for some entries but not all",
    ),
    ([1, 2], ":1: expected a JSON object, got list"),
  ],
)
def test_bad_rows(jsonl_dataset, row, expected):
  message = _error(jsonl_dataset([row]))
  assert expected in message and "interactions.jsonl" in message


def test_duplicate_unsplit_user(jsonl_dataset):
  root = jsonl_dataset([GOOD, GOOD])
  assert _error(root).endswith(":2: user 'u' already has an unsplit sequence at line 1; "
                               "give one sequence per user or set 'split' on every row")


def test_catalog_errors(jsonl_dataset):
  rows = CATALOG_ROWS + [{"item_id": "A", "title": "again"}]
  root = jsonl_dataset([GOOD], catalog=rows)
  assert _error(root) == f"{root / 'catalog.jsonl'}:6: duplicate item id 'A'"
  root = jsonl_dataset([GOOD], catalog=CATALOG_ROWS + [{"item_id": "F"}])
  assert _error(root) == f"{root / 'catalog.jsonl'}:6: missing required field 'title'"


def test_empty_dataset(jsonl_dataset):
  root = jsonl_dataset([])
  message = _error(root)
  assert message.startswith(f"{root / 'interactions.jsonl'}: no usable train examples")
  # Rows too short to yield a training example count as empty too.
  message = _error(jsonl_dataset([{"user_id": "u", "history": ["A", "B"]}]))
  assert "no usable train examples" in message
  root = jsonl_dataset([GOOD], catalog=[])
  assert _error(root).startswith(f"{root / 'catalog.jsonl'}: no usable items")


def test_missing_files(tmp_path):
  write_jsonl(tmp_path / "catalog.jsonl", CATALOG_ROWS)
  assert _error(tmp_path) == f"{tmp_path / 'interactions.jsonl'}: file not found (interactions.parquet is also accepted)"


def test_skip_mode_counts_bad_rows(jsonl_dataset):
  root = jsonl_dataset(
    [GOOD, "not json", {"user_id": "v", "history": ["A", "NOPE", "C", "D"]}, {"user_id": "w"}, GOOD | {"user_id": "x"}],
    catalog=CATALOG_ROWS + ["{broken", {"item_id": "F"}],
  )
  ds = read_jsonl(root, on_bad_data="skip")
  assert ds.skipped == 5
  assert {ex.user_id for ex in ds.train} == {"u", "x"}
  assert len(ds.catalog) == 5
  with pytest.raises(ValueError, match="on_bad_data"):
    read_jsonl(root, on_bad_data="ignore")


def test_skip_mode_still_rejects_empty_dataset(jsonl_dataset):
  root = jsonl_dataset(["bad", "worse"])
  with pytest.raises(DataError, match=r"no usable train examples \(2 bad rows skipped\)"):
    read_jsonl(root, on_bad_data="skip")


def test_invalid_utf8_line(jsonl_dataset):
  root = jsonl_dataset([GOOD])
  with (root / "interactions.jsonl").open("ab") as f:
    f.write(b'{"user_id": "\xff"}\n')
  assert _error(root) == f"{root / 'interactions.jsonl'}:2: invalid UTF-8 at byte 13"
  assert read_jsonl(root, on_bad_data="skip").skipped == 1


# ----------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, rows: list[dict]) -> Path:
  """Columns are the union of the rows' keys (missing ones null), as pandas/Spark exports have."""
  keys = list(dict.fromkeys(k for row in rows for k in row))
  pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in keys}), path)
  return path


PARQUET_INTERACTIONS = [
  {
    "user_id": "u1",
    "profile": {"age_band": "25-34"},
    "history": [
      {"item_id": "A", "timestamp": 10, "action": "view"},
      {"item_id": "B", "timestamp": 20, "action": "purchase"},
      {"item_id": "C", "timestamp": 30, "action": "purchase"},
      {"item_id": "D", "timestamp": 40, "action": "view"},
    ],
  },
  {
    "user_id": "u2",
    "profile": {"occupation": "teacher"},
    "history": [{"item_id": "C"}],
    "targets": [{"item_id": "E"}],
    "split": "test",
  },
]


def test_parquet_tables_read_like_jsonl(jsonl_dataset, tmp_path):
  catalog = [dict(row) for row in CATALOG_ROWS]
  del catalog[2]["brand"]  # a null cell in Parquet: absent, as in JSONL
  reference = read_jsonl(jsonl_dataset(PARQUET_INTERACTIONS, catalog=catalog))
  root = tmp_path / "pq"
  root.mkdir()
  write_parquet(root / "catalog.parquet", catalog)
  write_parquet(root / "interactions.parquet", PARQUET_INTERACTIONS)
  ds = read_jsonl(root)
  assert ds.train == [Example("u1", ("A",), ("B",), {"age_band": "25-34"}, (10,), ("view",))]
  assert ds.valid == [Example("u1", ("A", "B"), ("C",), {"age_band": "25-34"}, (10, 20), ("view", "purchase"))]
  assert ds.test == [
    Example("u1", ("A", "B", "C"), ("D",), {"age_band": "25-34"}, (10, 20, 30), ("view", "purchase", "purchase")),
    Example("u2", ("C",), ("E",), {"occupation": "teacher"}),
  ]
  assert (ds.train, ds.valid, ds.test) == (reference.train, reference.valid, reference.test)
  assert ds.catalog["C"].attributes == {"category": "Staplers"}
  assert [item.attributes for item in ds.catalog] == [item.attributes for item in reference.catalog]


def test_parquet_bad_rows_name_the_row(tmp_path):
  write_jsonl(tmp_path / "catalog.jsonl", CATALOG_ROWS)  # tables may mix formats
  rows = [GOOD, {"user_id": "v", "history": ["A", "Z"]}, {"user_id": "w", "history": None}, GOOD | {"user_id": "x"}]
  path = write_parquet(tmp_path / "interactions.parquet", rows)
  assert _error(tmp_path) == f"{path}:2: unknown item id 'Z' in field 'history'"
  ds = read_jsonl(tmp_path, on_bad_data="skip")
  assert ds.skipped == 2  # row 3's null history is a missing field
  assert {ex.user_id for ex in ds.train} == {"u", "x"}


def test_unreadable_parquet(tmp_path):
  write_jsonl(tmp_path / "catalog.jsonl", CATALOG_ROWS)
  (tmp_path / "interactions.parquet").write_bytes(b"not parquet")
  message = _error(tmp_path)
  assert message.startswith(f"{tmp_path / 'interactions.parquet'}: unreadable Parquet file (")


def test_jsonl_and_parquet_of_one_table_is_ambiguous(jsonl_dataset):
  root = jsonl_dataset([GOOD])
  write_parquet(root / "catalog.parquet", CATALOG_ROWS)
  assert _error(root) == f"{root}: both catalog.jsonl and catalog.parquet exist; keep only one"
