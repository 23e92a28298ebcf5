"""Amazon-2018 reader: the real Office_Products files and hand-made broken ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recllm_jax.data import DataError, read_amazon18
from recllm_jax.data.loading import detect_format

OFFICE_DIR = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "amazon18" / "Office_Products").resolve()


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


def test_valid_holdout_users_keeps_the_held_out_users_out_of_training(tmp_path):
  rows = [f'u{u},"[\'One\']",Two,[1],2,x,y' for u in range(40)]
  rows += [f'u{u},"[\'One\', \'Two\']",Three,"[1, 2]",3,x,y' for u in range(40)]
  root = _fake_amazon(tmp_path / "ds", rows)
  last = read_amazon18(root, valid_fraction=0.5)
  users = read_amazon18(root, valid_fraction=0.5, valid_holdout="users")
  held = {ex.user_id for ex in last.valid}
  assert held == {ex.user_id for ex in users.valid} and 0 < len(held) < 40
  # last_row: a held-out user's earlier row (1 -> 2) still trains; users: none of their rows do.
  assert held & {ex.user_id for ex in last.train} == held
  assert not held & {ex.user_id for ex in users.train}
  assert {ex.user_id for ex in users.train} == {f"u{u}" for u in range(40)} - held
  with pytest.raises(ValueError, match="valid_holdout"):
    read_amazon18(root, valid_holdout="rows")
