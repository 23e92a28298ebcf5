"""Baseline config: `python scripts/baselines.py [--config configs/baselines.py] --split test`.

Fits popularity, item-to-item transition (Markov) and SASRec on the dataset's training split and
scores them with `recllm_jax.rec.metrics.evaluate_rankings` on `--split`, writing
`<workdir>/baselines_<split>.json`. Override any key with `--config.key=value`, e.g.
`--config.data.dir=../shared/data/amazon18/Office_Products --config.data.format=amazon18`,
`--config.baselines=popularity,markov` (skip SASRec), `--config.sasrec.max_epochs=20`.
The config is locked: a mistyped key fails instead of being ignored.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from recllm_jax.rec.baselines.sasrec import SASRecConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "/tmp/recllm_baselines"  # results go to <workdir>/baselines_<split>.json
  c.seed = 0  # SASRec init, shuffling and dropout
  c.baselines = "popularity,markov,sasrec"
  c.ks = (1, 3, 5, 10, 20)

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # empty with format=synthetic: generated into <workdir>/data
  c.data.format = "auto"  # auto | jsonl | amazon18 | synthetic
  c.data.synthetic_seed = 0  # synthetic: the generator's seed, as in configs/sft.py
  c.data.on_bad_data = "error"  # error | skip
  # amazon18's valid split, as in configs/sft.py: compare baselines with a model on the same rows.
  c.data.valid_fraction = 0.1
  c.data.valid_holdout = "last_row"  # last_row | users

  c.popularity = ml_collections.ConfigDict()
  c.popularity.exclude_history = False  # the published Amazon protocol keeps history items

  c.markov = ml_collections.ConfigDict()
  c.markov.backoff = 1  # history items consulted, newest first, before popularity

  c.sasrec = ml_collections.ConfigDict()
  for field in dataclasses.fields(SASRecConfig):
    if field.name != "seed":  # the run's seed
      c.sasrec[field.name] = field.default
  c.lock()
  return c
