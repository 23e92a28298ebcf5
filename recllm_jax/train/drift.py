"""Drift on resume: a resumed run's config and data must mean what its checkpoints mean.

A workdir keeps the config it was trained with (`config.json`) and a fingerprint of its training
data (`data_fingerprint.json`: `rec.cf_prior.data_fingerprint`, counts and SHA-256 digests of the
catalog and the train/valid examples). Resuming compares them with the new run's, before
anything heavy is built:

  * `MEANING_KEYS` (model size, tokenizer and vocabulary, item format, weight source, LoRA,
    precision of the saved state, the task) and the data's contents: a change is a one-line
    `ResumeDriftError` naming every changed key. `data.dir` itself may move (same contents).
  * every other change is allowed and logged in one line: at INFO when all changed keys are in
    `SAFE_KEYS` (steps, learning rate, intervals, paths, kernels), else at WARNING (e.g. `seed`
    or `train.batch_size`: the run continues, but on other batches than an uninterrupted run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections

from recllm_jax import paths
from recllm_jax.errors import ConfigError

log = logging.getLogger(__name__)

DATA_FINGERPRINT_FILE = "data_fingerprint.json"  # <workdir>/data_fingerprint.json

# Keys (or groups of keys, ending in '.') whose change makes the checkpoint mean something else.
MEANING_KEYS = (
    "task", "init_from",
    "model.preset", "model.hf_path", "model.tokenizer_path", "model.tokenizer_vocab_size",
    "model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
    "model.num_attention_heads", "model.num_key_value_heads", "model.lora.",
    "model.param_dtype", "train.master_dtype",
    "data.item_format", "data.format", "data.sid_file",
)
# Keys that change how the run goes on, not what its checkpoints mean (logged at INFO).
SAFE_KEYS = (
    "workdir", "data.dir",  # paths: the data's contents are checked by fingerprint
    "train.num_steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
    "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.peak_flops",
    "train.logits_chunk_size", "data.prefetch_threads", "model.attention", "model.remat",
    "profile.", "distributed.", "mesh.",
)


class ResumeDriftError(ConfigError):
  """The config or data of a resumed run changes what its checkpoints mean."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} of a nested config (a ConfigDict or the dicts of its JSON)."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _normal(value: Any) -> Any:
  """A value as JSON round-trips it (the saved config is JSON: tuples come back as lists)."""
  try:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
  except (TypeError, ValueError):
    return repr(value)


def compare_configs(saved: Any, new: Any) -> tuple[list[str], list[str], list[str]]:
  """(meaning, safe, other): the changed keys between two configs (ConfigDicts or dicts),
  sorted, each as `key old -> new`. A key present on one side only counts as changed."""
  old_flat, new_flat = _flatten(saved), _flatten(new)
  meaning, safe, other = [], [], []
  missing = object()
  for key in sorted(old_flat.keys() | new_flat.keys()):
    before, after = old_flat.get(key, missing), new_flat.get(key, missing)
    before = before if before is missing else _normal(before)
    after = after if after is missing else _normal(after)
    if before == after:
      continue
    text = (f"{key} {'(absent)' if before is missing else repr(before)} -> "
            f"{'(absent)' if after is missing else repr(after)}")
    (meaning if _matches(key, MEANING_KEYS) else
     safe if _matches(key, SAFE_KEYS) else other).append(text)
  return meaning, safe, other


def check_config(saved: Any, new: Any, where: str) -> None:
  """Raises `ResumeDriftError` naming the `MEANING_KEYS` that changed between the config the
  checkpoints in `where` were trained with (`saved`) and this run's (`new`); logs the rest."""
  meaning, safe, other = compare_configs(saved, new)
  if meaning:
    raise ResumeDriftError(
        f"resuming {where} with a config that changes what its checkpoints mean: "
        f"{'; '.join(meaning)}. Resume with the config it was trained with, or train into a "
        "new workdir (init_from=<this workdir> starts from its params)")
  if other:
    log.warning("resuming with changed config keys: %s (allowed; the run goes on from the "
                "checkpoint, but differs from an uninterrupted one)", "; ".join(safe + other))
  elif safe:
    log.info("resuming with changed config keys (safe): %s", "; ".join(safe))


def check_resume_config(config: ml_collections.ConfigDict, workdir: Any) -> None:
  """`check_config` against `<workdir>/config.json` (skipped, with a warning, if absent)."""
  from recllm_jax.train import build

  path = paths.workdir_path(workdir) / build.CONFIG_FILE
  if not path.exists():
    log.warning("%s has checkpoints but no %s: the resumed config is not checked for drift",
                workdir, build.CONFIG_FILE)
    return
  saved = build.read_run_config(workdir).to_dict()
  new = json.loads(config.to_json_best_effort(sort_keys=True))
  check_config(saved, new, str(workdir))


# How a run writes items (data/items.py); a checkpoint only means something under its own.
ITEM_KEYS = {"data.item_format": "title", "data.sid_file": ""}


def check_item_codes(config: ml_collections.ConfigDict, workdir: Any, role: str) -> None:
  """ConfigError when `config` writes items otherwise than the run in `workdir` did (`role`:
  how this run uses it, e.g. "init_from" or "--config.workdir"), so that starting from or
  evaluating a checkpoint under other item codes (a forgotten `data.sid_file`) fails instead of
  silently reading the wrong tokens. Skipped for a workdir without `config.json`."""
  from recllm_jax.train import build

  if not (paths.workdir_path(workdir) / build.CONFIG_FILE).exists():
    return
  saved, new = _flatten(build.read_run_config(workdir)), _flatten(config)

  def value(flat: dict[str, Any], key: str) -> str:
    v = str(flat.get(key) or ITEM_KEYS[key])
    return str(Path(v).expanduser().resolve()) if key.endswith("_file") and v else v

  changed = [f"{key}={value(saved, key)!r} there, {value(new, key)!r} here"
             for key in ITEM_KEYS if value(saved, key) != value(new, key)]
  if changed:
    raise ConfigError(f"{role}={workdir} was trained with other item codes than this run "
                      f"writes: {'; '.join(changed)}. Pass the keys that run was trained with "
                      f"(its {build.CONFIG_FILE})")


def read_data_fingerprint(workdir: Any) -> dict[str, Any] | None:
  """The fingerprint of the data a run in `workdir` was trained on (`DATA_FINGERPRINT_FILE`), or
  None when it has none (a run from before fingerprints were saved, or no run at all)."""
  path = paths.workdir_path(workdir) / DATA_FINGERPRINT_FILE
  return json.loads(path.read_text()) if path.exists() else None


def check_data(fingerprint: dict[str, Any] | None, workdir: Any, resuming: bool,
               data_dir: str = "") -> None:
  """Compares `fingerprint` (None: the task has no dataset) with `<workdir>`'s saved one when
  `resuming` (`ResumeDriftError` naming the parts that differ), then records it (process 0).

  A workdir from before fingerprints were saved gets one, unchecked (with a warning)."""
  if fingerprint is None:
    return
  path = paths.workdir_path(workdir) / DATA_FINGERPRINT_FILE
  if resuming:
    saved = read_data_fingerprint(workdir)
    if saved is not None:
      changed = [k for k in sorted(saved.keys() | fingerprint.keys())
                 if saved.get(k) != fingerprint.get(k)]
      if changed:
        counts = [f"{k} {saved.get(k)} -> {fingerprint.get(k)}" for k in changed
                  if k.startswith("num_")]
        raise ResumeDriftError(
            f"resuming {workdir} on other data than its checkpoints were trained on: "
            f"data.dir={data_dir!r} differs in {', '.join(changed)}"
            f"{' (' + '; '.join(counts) + ')' if counts else ''}. Resume with the data it was "
            "trained on, or train into a new workdir (init_from=<this workdir>)")
      return
    log.warning("%s has no %s (saved by an older version): the data is not checked; recording "
                "this run's", workdir, DATA_FINGERPRINT_FILE)
  if jax.process_index() == 0:
    path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))


__all__ = ["DATA_FINGERPRINT_FILE", "MEANING_KEYS", "ResumeDriftError", "SAFE_KEYS",
           "check_config", "check_data", "check_item_codes", "check_resume_config",
           "compare_configs", "read_data_fingerprint"]
