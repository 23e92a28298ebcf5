"""Dataset readers: JSONL format, leave-last-out splitting, bad-data handling, Amazon-2018."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recllm_jax.data import DataError, Example, load_dataset, read_amazon18, read_jsonl
from recllm_jax.data.sources import detect_format

from sample_data import CATALOG_ROWS, write_jsonl

OFFICE_DIR = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "amazon18" / "Office_Products").resolve()


# ----------------------------------------------------------------------------- JSONL


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
  assert _error(tmp_path) == f"{tmp_path / 'interactions.jsonl'}: file not found"


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


def test_load_dataset_dispatch(jsonl_dataset, tmp_path):
  root = jsonl_dataset([GOOD])
  assert detect_format(root) == "jsonl"
  assert load_dataset(root).train == read_jsonl(root).train
  with pytest.raises(DataError, match="no dataset found"):
    load_dataset(tmp_path / "missing")
  with pytest.raises(ValueError, match="fmt must be one of"):
    load_dataset(root, fmt="parquet")


def test_synthetic_roundtrip(synthetic_dir):
  ds = load_dataset(synthetic_dir, "jsonl")
  assert len(ds.catalog) == 500
  assert len(ds.test) == len(ds.valid) == 400  # one of each per user (leave-last-out)
  assert ds.skipped == 0
  rows = [json.loads(line) for line in (synthetic_dir / "interactions.jsonl").read_text().splitlines()]
  by_user = {row["user_id"]: [e["item_id"] for e in row["history"]] for row in rows}
  for ex in ds.test:
    assert list(ex.history) + list(ex.targets) == by_user[ex.user_id]
  for ex in ds.train[:200]:
    seq = by_user[ex.user_id]
    assert list(ex.history) + list(ex.targets) == seq[: len(ex.history) + 1]
    assert len(ex.history) + 1 <= len(seq) - 2
    assert ex.timestamps is not None and len(ex.timestamps) == len(ex.history)


# ----------------------------------------------------------------------------- Amazon 2018


@pytest.fixture(scope="module")
def office():
  if not OFFICE_DIR.exists():
    pytest.skip(f"real Amazon-2018 Office data not found at {OFFICE_DIR}")
  return read_amazon18(OFFICE_DIR)


def _csv_rows(name: str) -> list[tuple[str, tuple[str, ...], str]]:
  import ast
  import csv

  with (OFFICE_DIR / name).open(newline="", encoding="utf-8") as f:
    return [
      (r["user_id"], tuple(str(i) for i in ast.literal_eval(r["history_item_id"])), str(int(r["item_id"])))
      for r in csv.DictReader(f)
    ]


def test_amazon_counts(office):
  assert len(office.catalog) == 3459
  assert len(office.test) == 4866
  assert office.skipped == 0
  assert detect_format(OFFICE_DIR) == "amazon18"
  item = office.catalog["0"]
  assert item.title.startswith("HP 74 Black & 75 Tri-color")
  assert item.attributes["brand"] == "HP"
  assert "categories" not in item.attributes  # empty in this dump
  assert "HP 74 & 75 ink cartridges" in item.attributes["description"]


def test_amazon_test_split_is_test_csv_verbatim(office):
  assert [(ex.user_id, ex.history, ex.targets[0]) for ex in office.test] == _csv_rows("test.csv")


def test_amazon_train_comes_from_valid_csv_without_leakage(office):
  valid_rows = _csv_rows("valid.csv")
  sequences: dict[str, list[tuple[str, ...]]] = {}
  for user, history, target in valid_rows:
    sequences.setdefault(user, []).append(history + (target,))
  keys = [(ex.user_id, ex.history, ex.targets[0]) for ex in office.train]
  assert len(keys) == len(set(keys)), "train must be deduplicated"
  for user, history, target in keys:
    # Every train example is a prefix (+ next item) of one of that user's valid.csv rows.
    assert any(seq[: len(history) + 1] == history + (target,) for seq in sequences[user])
  test_keys = set(_csv_rows("test.csv"))
  assert not test_keys & set(keys)
  # The held-out valid rows: each user's last valid.csv row, never in train.
  last = {}
  for row in valid_rows:
    last[row[0]] = row
  valid_keys = [(ex.user_id, ex.history, ex.targets[0]) for ex in office.valid]
  assert 100 < len(valid_keys) < 300  # ~10% of 1,795 users
  assert all(last[user] == (user, h, t) for user, h, t in valid_keys)
  assert not set(valid_keys) & set(keys)
  # Held-out rows are each user's latest event: no train example of theirs reaches that far.
  train_sequences = {(user, history + (target,)) for user, history, target in keys}
  for user, history, target in valid_keys:
    assert (user, history + (target,)) not in train_sequences


def test_amazon_duplicate_titles(office):
  catalog = office.catalog
  assert len(catalog.titles()) == 3443
  ids = catalog.ids_for_title("Sharpie Liquid Highlighters, Chisel Tip, Assorted Colors, 10 Count")
  assert ids == ["112", "118"]
  assert catalog.ground_title("Sharpie Liquid Highlighters, Chisel Tip, Assorted Colors, 10 Count") == "112"
  assert catalog.ground_title("Sharpie Liquid Highlighters, Chisel Tip, Assorted Colors, 10 Count",
                              {"118": 3, "112": 1}) == "118"
  # Whitespace is normalised: the catalog title has a double space.
  assert catalog.ids_for_title("EXPO 86074 Low-Odor Dry Erase Markers, Fine Point, Assorted Colors, 4-Count") == ["206"]
  assert catalog.ground_title("Not A Real Product") is None


def _fake_amazon(root: Path, valid_lines: list[str]) -> Path:
  root.mkdir()
  (root / "items.json").write_text(json.dumps({"1": {"title": "One"}, "2": {"title": "Two"}, "3": {"title": "Three"}}))
  header = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid\n"
  (root / "valid.csv").write_text(header + "".join(line + "\n" for line in valid_lines))
  (root / "test.csv").write_text(header + 'u1,"[\'One\', \'Two\']",Three,"[1, 2]",3,x,y\n')
  return root


def test_amazon_reader_errors_and_dedup(tmp_path):
  good = ['u1,"[\'One\']",Two,[1],2,x,y', 'u1,"[\'One\', \'Two\']",Three,"[1, 2]",3,x,y']
  ds = read_amazon18(_fake_amazon(tmp_path / "ok", good), valid_fraction=0.0)
  # Row 2's prefix [1] -> 2 duplicates row 1 and is kept once.
  assert [(ex.history, ex.targets) for ex in ds.train] == [(("1",), ("2",)), (("1", "2"), ("3",))]
  assert ds.valid == [] and len(ds.test) == 1

  root = _fake_amazon(tmp_path / "bad", good + ['u2,"[]",X,"[1, 99]",2,x,y', 'u3,"[]",X,"[1,",2,x,y'])
  with pytest.raises(DataError, match=re.escape(f"{root / 'valid.csv'}:4: unknown item id '99' in field 'history_item_id'")):
    read_amazon18(root)
  ds = read_amazon18(root, on_bad_data="skip")
  assert ds.skipped == 2 and len(ds.train) == 2
  with pytest.raises(DataError, match=r"valid\.csv: no usable train examples"):
    read_amazon18(_fake_amazon(tmp_path / "empty", []))


def test_invalid_utf8_line(jsonl_dataset):
  root = jsonl_dataset([GOOD])
  with (root / "interactions.jsonl").open("ab") as f:
    f.write(b'{"user_id": "\xff"}\n')
  assert _error(root) == f"{root / 'interactions.jsonl'}:2: invalid UTF-8 at byte 13"
  assert read_jsonl(root, on_bad_data="skip").skipped == 1
