"""One entry point for every dataset format: :func:`load_dataset`.

Configs name a directory and a format (``data.dir``, ``data.format``); this
module maps them onto the readers (:mod:`~recllm_jax.data.jsonl`,
:mod:`~recllm_jax.data.amazon18`) and the synthetic generator, so training
code never needs to know which one it got. Every reader follows the same
bad-data policy: with ``on_bad_data="error"`` the first malformed row raises
:class:`~recllm_jax.data.errors.DataError` naming ``file:line``; with
``"skip"`` the row is dropped and counted in :attr:`RecDataset.skipped`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recllm_jax.data.amazon18 import ITEMS_FILE, TEST_FILE, VALID_FILE, read_amazon18
from recllm_jax.data.errors import DataError
from recllm_jax.data.items import ItemCodec, make_codec
from recllm_jax.data.jsonl import read_jsonl
from recllm_jax.data.schema import (
  CATALOG_FILE,
  CATALOG_PARQUET,
  INTERACTIONS_FILE,
  INTERACTIONS_PARQUET,
  RecDataset,
)
from recllm_jax.data.synthetic import ensure_synthetic
from recllm_jax.errors import MissingPathError

__all__ = ["FORMATS", "data_dir", "detect_format", "load_dataset", "load_run_data"]

FORMATS = ("auto", "jsonl", "amazon18", "synthetic")


def detect_format(data_dir: str | os.PathLike[str]) -> str:
  """Guess the format from the files present; raises if nothing matches."""
  root = Path(data_dir)
  if (root / CATALOG_FILE).is_file() or (root / CATALOG_PARQUET).is_file():
    return "jsonl"
  if (root / ITEMS_FILE).is_file() and (root / VALID_FILE).is_file():
    return "amazon18"
  raise DataError(
    f"no dataset found: expected {CATALOG_FILE}+{INTERACTIONS_FILE} or "
    f"{CATALOG_PARQUET}+{INTERACTIONS_PARQUET} (jsonl) or "
    f"{ITEMS_FILE}+{VALID_FILE}+{TEST_FILE} (amazon18); use fmt='synthetic' to generate one",
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
  valid_holdout: str = "last_row",
  seed: int = 0,
) -> RecDataset:
  """Load a dataset directory in any supported format.

  ``fmt="synthetic"`` generates the offline default dataset into
  ``data_dir`` with ``seed``, reusing data already there when it was made
  with the same seed by the same generator version and regenerating it
  (with a warning) otherwise (see :func:`~recllm_jax.data.synthetic.ensure_synthetic`),
  then reads it as JSONL, so configs can point at a cache directory and get
  the same data on every host. ``valid_fraction`` and ``valid_holdout`` only affect ``amazon18``. ``min_history`` drops
  examples with shorter histories from every split; ``max_history`` keeps
  only the newest events of each history.
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  root = Path(data_dir)
  if fmt == "synthetic":
    ensure_synthetic(root, seed=seed)
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
      valid_holdout=valid_holdout,
    )
  return read_jsonl(root, on_bad_data=on_bad_data, min_history=min_history, max_history=max_history)


def _check_synthetic_dir(root: Path, workdir: Path) -> None:
  """Generated data goes into a folder that exists or one under the workdir, never a new folder
  elsewhere: that is far more often a mistyped path to the user's own data than a wish."""
  if root.exists() or root.absolute().is_relative_to(workdir.absolute()):
    return
  raise MissingPathError(
      f"data.dir={str(root)!r} does not exist. data.format='synthetic' generates the offline "
      f"demo data, and only into a folder that exists or one under the workdir (leave data.dir "
      f"empty for {workdir / 'data'}). For your own data, fix the path and set data.format to "
      "jsonl (JSONL or Parquet files), amazon18 or auto (docs/data.md); for a new synthetic "
      "cache, create the folder first")


def data_dir(config: Any, workdir: str | os.PathLike[str]) -> Path:
  """A run's data folder: `data.dir`, or `<workdir>/data` for generated synthetic data."""
  if config.data.dir:
    root = Path(config.data.dir)
    if config.data.format == "synthetic":
      _check_synthetic_dir(root, Path(workdir))
    return root
  if config.data.format == "synthetic":
    return Path(workdir) / "data"
  raise DataError(f"data.dir is empty; set --config.data.dir (format={config.data.format!r})")


def load_run_data(config: Any, workdir: str | os.PathLike[str]) -> tuple[RecDataset, ItemCodec]:
  """The dataset of a run config (`data.*`) and its item codec (`data.item_format`).

  Configs written before `data.item_format` existed mean titles; before `data.synthetic_seed`,
  synthetic data came from the run's `seed`.
  """
  root = data_dir(config, workdir)
  dataset = load_dataset(root, config.data.format, on_bad_data=config.data.on_bad_data,
                         valid_fraction=config.data.get("valid_fraction", 0.1),
                         valid_holdout=config.data.get("valid_holdout", "last_row"),
                         seed=config.data.get("synthetic_seed", config.get("seed", 0)))
  return dataset, make_codec(config.data.get("item_format", "title"), dataset.catalog, root,
                             config.data.get("sid_file", "") or None)
