"""load_dataset/detect_format: dispatch to the readers and the synthetic generator."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recllm_jax.data import DataError, load_dataset, read_jsonl
from recllm_jax.data.loading import detect_format

from sample_data import CATALOG_ROWS

GOOD = {"user_id": "u", "history": ["A", "B", "C", "D"]}


def test_load_dataset_dispatch(jsonl_dataset, tmp_path):
  root = jsonl_dataset([GOOD])
  assert detect_format(root) == "jsonl"
  assert load_dataset(root).train == read_jsonl(root).train
  with pytest.raises(DataError, match="no dataset found"):
    load_dataset(tmp_path / "missing")
  with pytest.raises(ValueError, match="fmt must be one of"):
    load_dataset(root, fmt="parquet")


def test_detect_format_by_files(tmp_path):
  pq_dir, amazon_dir = tmp_path / "pq", tmp_path / "amazon"
  pq_dir.mkdir()
  amazon_dir.mkdir()
  pq.write_table(pa.table({"item_id": [r["item_id"] for r in CATALOG_ROWS]}), pq_dir / "catalog.parquet")
  assert detect_format(pq_dir) == "jsonl"
  (amazon_dir / "items.json").write_text("{}")
  with pytest.raises(DataError, match="no dataset found"):
    detect_format(amazon_dir)  # items.json alone is not enough
  (amazon_dir / "valid.csv").write_text("")
  assert detect_format(amazon_dir) == "amazon18"


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




def test_synthetic_data_dir_must_exist_or_sit_under_the_workdir(tmp_path):
  from ml_collections import ConfigDict

  from recllm_jax.data.loading import data_dir
  from recllm_jax.errors import MissingPathError

  def config(path: str) -> ConfigDict:
    return ConfigDict({"data": {"dir": path, "format": "synthetic"}})

  workdir = tmp_path / "run"
  assert data_dir(config(""), workdir) == workdir / "data"
  assert data_dir(config(str(workdir / "cache")), workdir) == workdir / "cache"  # under it
  (tmp_path / "shared").mkdir()
  assert data_dir(config(str(tmp_path / "shared")), workdir) == tmp_path / "shared"  # exists
  with pytest.raises(MissingPathError, match="data.dir=.*typo' does not exist"):
    data_dir(config(str(tmp_path / "typo")), workdir)
  # Another format's folder is checked where it is read, not here.
  other = ConfigDict({"data": {"dir": str(tmp_path / "typo"), "format": "jsonl"}})
  assert data_dir(other, workdir) == tmp_path / "typo"


def test_runs_over_seeds_share_one_synthetic_dataset(tmp_path):
  """`seed` is the run's (init, data order); the data come from `data.synthetic_seed`, so a study
  over seeds neither changes nor regenerates a shared folder (it once wiped sids.tsv there)."""
  from ml_collections import ConfigDict

  from recllm_jax.data.loading import load_run_data

  def config(seed: int, synthetic_seed: int = 0) -> ConfigDict:
    return ConfigDict({"seed": seed, "data": {
        "dir": str(tmp_path / "data"), "format": "synthetic", "on_bad_data": "error",
        "synthetic_seed": synthetic_seed, "item_format": "title"}})

  (tmp_path / "data").mkdir()  # a shared cache folder, made by the user
  first, _ = load_run_data(config(0), tmp_path / "run0")
  (tmp_path / "data" / "sids.tsv").write_text("kept\n")  # a file built beside the data
  second, _ = load_run_data(config(1), tmp_path / "run1")
  assert second.train == first.train and (tmp_path / "data" / "sids.tsv").exists()
  other, _ = load_run_data(config(0, synthetic_seed=3), tmp_path / "run2")
  assert other.train != first.train  # the generator's seed does change the data
