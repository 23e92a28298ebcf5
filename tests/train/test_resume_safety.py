"""What a resume survives (issue 17, items 2 to 4): a kill -9 during a save, a damaged newest
checkpoint, a failed write (ENOSPC), another process count, and config / data drift.
docs/training.md, "What survives what".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import (  # noqa: E402,F401  (the small SFT setup)
    _cli, _env, data_dir, make_config, read_metrics)


# --- Checkpointer level: a tiny state and a Grain iterator (milliseconds per step) ------------


def _iterator():
  import grain

  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(value: float):
  import jax.numpy as jnp

  return {"w": jnp.full((4, 4), value)}


def _checkpointer(workdir: Path, **kw):
  from recllm_jax.train.checkpoint import Checkpointer

  return Checkpointer(workdir, every=1, keep=5, **kw)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
  """A workdir with checkpoints 1, 2, 3; at step s the state is s and the iterator is at s."""
  workdir = tmp_path_factory.mktemp("three_steps")
  ckpt, data = _checkpointer(workdir), _iterator()
  for step in (1, 2, 3):
    next(data)
    ckpt.save(step, _state(float(step)), data)
  ckpt.close()
  return workdir


@pytest.fixture
def workdir(three_steps, tmp_path) -> Path:
  shutil.copytree(three_steps, tmp_path / "w")
  return tmp_path / "w"


def _truncate_arrays(step_dir: Path) -> None:
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      os.truncate(f, f.stat().st_size // 2)


DAMAGE = {
    "truncated array file": (_truncate_arrays, "ValueError"),
    "deleted data iterator file": (
        lambda d: (d / "data" / "process_0-of-1.json").unlink(), "process_0-of-1.json"),
    "deleted array manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "Error"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_newest_intact_one(workdir, damage, caplog):
  from recllm_jax.train.checkpoint import DAMAGED_DIR, finalized_steps

  damage_fn, named = DAMAGE[damage]
  damage_fn(workdir / "checkpoints" / "3")
  ckpt, data = _checkpointer(workdir), _iterator()
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(_state(0.0), data)
  # Params and data iterator both from step 2: the resume stays exact.
  assert step == 2 and float(state["w"][0, 0]) == 2.0 and next(data) == 2
  warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
  assert "checkpoint 3" in warning and named in warning
  # Set aside (kept, not deleted) so that the run can write step 3 again.
  assert (workdir / DAMAGED_DIR / "3").is_dir() and finalized_steps(workdir) == [1, 2]
  assert ckpt.save(3, _state(3.0), data)
  ckpt.close()
  assert finalized_steps(workdir) == [1, 2, 3]


def test_no_intact_step_left_is_one_error_never_a_fresh_start(workdir):
  from recllm_jax.errors import UserError
  from recllm_jax.train.checkpoint import NoIntactCheckpointError

  for step in (1, 2, 3):
    _truncate_arrays(workdir / "checkpoints" / str(step))
  ckpt = _checkpointer(workdir)
  with pytest.raises(NoIntactCheckpointError, match=r"no checkpoint in .* can be restored: "
                     r"step 3: ValueError.*; step 2: .*; step 1: ") as e:
    ckpt.restore_latest(_state(0.0), _iterator())
  assert isinstance(e.value, UserError)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]  # nothing moved
  ckpt.close()


def test_empty_workdir_is_a_fresh_start(tmp_path):
  ckpt = _checkpointer(tmp_path)
  step, state, extra = ckpt.restore_latest(_state(7.0), _iterator())
  assert (step, float(state["w"][0, 0]), extra) == (0, 7.0, None)
  ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_write_names_the_disk_and_keeps_the_earlier_steps(workdir, monkeypatch,
                                                                   async_save):
  from etils import epath

  from recllm_jax.train.checkpoint import CheckpointWriteError, finalized_steps

  # The disk fills up while step 4 is written (Grain's iterator file, inside Orbax's save).
  cls = type(epath.Path(workdir))
  write_text = cls.write_text

  def full_disk(self, *args, **kwargs):
    if re.search(r"/checkpoints/4[./]", str(self)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(cls, "write_text", full_disk)
  ckpt, data = _checkpointer(workdir, async_save=async_save), _iterator()
  ckpt.restore_latest(_state(0.0), data)
  with pytest.raises(CheckpointWriteError) as e:
    next(data)
    ckpt.save(4, _state(4.0), data)
    ckpt.close()
  message = str(e.value)
  assert message.startswith("writing checkpoint 4 failed: no space left on device at ")
  assert f"disk of {workdir / 'checkpoints'}: " in message and " GiB free of " in message
  assert "complete steps: 1, 2, 3" in message and e.value.errno == errno.ENOSPC
  assert not ckpt.save(5, _state(5.0), data)  # saving stops after a failed write
  ckpt.close()  # already reported: no second error
  assert finalized_steps(workdir) == [1, 2, 3]

  # Space freed: the rerun resumes from step 3 and writes step 4 over the partial one.
  monkeypatch.undo()
  ckpt, data = _checkpointer(workdir), _iterator()
  step, state, _ = ckpt.restore_latest(_state(0.0), data)
  assert step == 3 and float(state["w"][0, 0]) == 3.0
  next(data)
  assert ckpt.save(4, _state(4.0), data)
  ckpt.close()
  assert finalized_steps(workdir) == [1, 2, 3, 4]


def test_another_process_count_reshards_the_data_iterator_state(workdir, caplog):
  from recllm_jax.train.checkpoint import ProcessCountError

  # As if step 3 had been saved by 2 processes (each holds the same batch index).
  iter_dir = workdir / "checkpoints" / "3" / "data"
  saved = (iter_dir / "process_0-of-1.json").read_text()
  (iter_dir / "process_0-of-1.json").rename(iter_dir / "process_0-of-2.json")
  (iter_dir / "process_1-of-2.json").write_text(saved)
  ckpt, data = _checkpointer(workdir), _iterator()
  with caplog.at_level(logging.WARNING):
    step, _, _ = ckpt.restore_latest(_state(0.0), data)
  assert step == 3 and next(data) == 3
  assert "saved by 2 processes and this run has 1" in caplog.text

  # States that differ cannot be re-sharded: one line saying what to do.
  (iter_dir / "process_1-of-2.json").write_text(json.dumps({"next_index": 9}))
  with pytest.raises(ProcessCountError, match=r"was saved by 2 processes and this run has 1.*"
                     r"resume with 2 processes \(distributed.num_processes=2\), or .*init_from="):
    ckpt.restore(3, _state(0.0), _iterator())
  ckpt.close()


# --- drift: the comparison, with hand-made configs ---------------------------------------------


def _config(**overrides):
  from configs import sft as sft_configs

  config = sft_configs.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("key, value", [
    ("model.hidden_size", 64), ("model.num_hidden_layers", 2), ("model.num_attention_heads", 8),
    ("model.intermediate_size", 99), ("model.tokenizer_vocab_size", 999),
    ("model.tokenizer_path", "/tok"), ("data.item_format", "sid"), ("model.lora.rank", 4),
    ("model.preset", "small"), ("task", "grpo"),
])
def test_a_change_of_meaning_is_one_error_naming_the_key(key, value):
  from recllm_jax.errors import ConfigError
  from recllm_jax.train import drift

  saved = json.loads(_config().to_json_best_effort())  # as config.json holds it
  with pytest.raises(drift.ResumeDriftError, match=re.escape(f"{key} ")) as e:
    drift.check_config(saved, _config(**{key: value}), "/w")
  assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_a_checkpoint_used_under_other_item_codes_is_one_error_naming_the_keys(tmp_path):
  """init_from / evaluation of a run trained with data.sid_file, without it (or with another
  item format), fails before anything reads the wrong tokens; the same codes pass."""
  from recllm_jax.errors import ConfigError
  from recllm_jax.train import drift

  run = tmp_path / "sft"
  drift.check_item_codes(_config(), run, "init_from")  # no config.json: nothing to compare
  run.mkdir()
  trained = _config(**{"data.item_format": "sid", "data.sid_file": str(tmp_path / "sids.tsv")})
  (run / "config.json").write_text(trained.to_json_best_effort())
  drift.check_item_codes(trained, run, "init_from")
  with pytest.raises(ConfigError, match=re.escape(
      f"init_from={run} was trained with other item codes than this run writes: "
      f"data.sid_file='{tmp_path / 'sids.tsv'}' there, '' here.")):
    drift.check_item_codes(_config(**{"data.item_format": "sid"}), run, "init_from")
  with pytest.raises(ConfigError, match=r"data.item_format='sid' there, 'title' here; "
                                        r"data.sid_file=.* there, '' here"):
    drift.check_item_codes(_config(), run, "--config.workdir")
  # A config.json from before data.sid_file existed means no SID file.
  saved = json.loads(_config(**{"data.item_format": "sid"}).to_json_best_effort())
  del saved["data"]["sid_file"]
  (run / "config.json").write_text(json.dumps(saved))
  drift.check_item_codes(_config(**{"data.item_format": "sid"}), run, "init_from")


def test_the_error_names_every_changed_meaning_key_and_not_the_safe_ones():
  from recllm_jax.train import drift

  meaning, safe, other = drift.compare_configs(
      _config(), _config(**{"model.hidden_size": 64, "data.item_format": "sid",
                            "train.lr": 1.0, "train.num_steps": 5, "seed": 3}))
  assert meaning == ["data.item_format 'title' -> 'sid'", "model.hidden_size 0 -> 64"]
  assert safe == ["train.lr 0.003 -> 1.0", "train.num_steps 300 -> 5"]
  assert other == ["seed 0 -> 3"]


def test_safe_changes_are_allowed_and_logged_in_one_line(caplog):
  from recllm_jax.train import drift

  saved = json.loads(_config().to_json_best_effort())
  with caplog.at_level(logging.INFO, logger="recllm_jax.train.drift"):
    drift.check_config(saved, _config(**{"train.num_steps": 500, "train.lr": 1e-3,
                                          "train.log_every": 5, "train.eval_every": 7,
                                          "train.checkpoint_every": 50}), "/w")
  (record,) = caplog.records
  assert record.levelno == logging.INFO
  for key in ("train.num_steps 300 -> 500", "train.lr", "train.log_every", "train.eval_every",
              "train.checkpoint_every"):
    assert key in record.getMessage()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="recllm_jax.train.drift"):
    drift.check_config(saved, _config(**{"seed": 1, "train.lr": 1e-3}), "/w")
  (record,) = caplog.records  # a change not known to be safe: still allowed, at WARNING
  assert record.levelno == logging.WARNING and "seed 0 -> 1" in record.getMessage()
  with caplog.at_level(logging.INFO, logger="recllm_jax.train.drift"):
    caplog.clear()
    drift.check_config(saved, _config(), "/w")  # no change: nothing logged
  assert not caplog.records


def test_data_fingerprint_is_recorded_then_checked(tmp_path):
  from recllm_jax.train import drift

  fingerprint = {"num_items": 60, "items_sha256": "a", "num_train": 50, "train_sha256": "b"}
  drift.check_data(fingerprint, tmp_path, resuming=False)
  assert json.loads((tmp_path / drift.DATA_FINGERPRINT_FILE).read_text()) == fingerprint
  drift.check_data(fingerprint, tmp_path, resuming=True)  # same data: fine
  other = {**fingerprint, "num_train": 49, "train_sha256": "c"}
  with pytest.raises(drift.ResumeDriftError,
                     match=r"data.dir='/d' differs in num_train, train_sha256 \(num_train 50 -> "
                           r"49\)"):
    drift.check_data(other, tmp_path, resuming=True, data_dir="/d")


# --- through loop.train ----------------------------------------------------------------------


def test_resume_with_a_changed_model_size_is_one_error_naming_the_keys(tmp_path, data_dir):  # noqa: F811
  """A workdir as a run leaves it (its config.json, a complete checkpoint), resumed through
  `loop.train` with other model sizes: stopped before anything is loaded or built."""
  from recllm_jax.train.drift import ResumeDriftError
  from recllm_jax.train.loop import save_config, train

  save_config(make_config(tmp_path, data_dir), tmp_path)
  ckpt = _checkpointer(tmp_path)
  ckpt.save(1, _state(1.0), _iterator())
  ckpt.close()
  changed = make_config(tmp_path, data_dir, **{"model.hidden_size": 64,
                                                "model.num_hidden_layers": 2})
  with pytest.raises(ResumeDriftError, match=r"model.hidden_size 32 -> 64; model.num_hidden_layers "
                     r"1 -> 2\. Resume with the config it was trained with"):
    train(changed)
  # The saved config is not replaced by the rejected one.
  assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):  # noqa: F811
  """A real 2-step run with checkpoints 1 and 2 (and the overrides it ran with)."""
  from recllm_jax.train.loop import train

  workdir = tmp_path_factory.mktemp("trained")
  overrides = {"train.num_steps": 2, "train.checkpoint_every": 1}
  train(make_config(workdir, data_dir, **overrides))
  return workdir, overrides


@pytest.mark.slow
def test_resume_on_other_data_is_one_error(trained, tmp_path, data_dir):  # noqa: F811
  from recllm_jax.data.schema import INTERACTIONS_FILE
  from recllm_jax.train.drift import ResumeDriftError
  from recllm_jax.train.loop import train

  workdir, overrides = trained
  shutil.copytree(workdir, tmp_path / "w")
  other = tmp_path / "other"  # the same files, one interaction fewer
  shutil.copytree(data_dir, other)
  rows = (other / INTERACTIONS_FILE).read_text().splitlines(keepends=True)
  (other / INTERACTIONS_FILE).write_text("".join(rows[:-1]))
  with pytest.raises(ResumeDriftError, match=r"on other data than its checkpoints were trained "
                     r"on: data.dir='.*other' differs in .*train_sha256"):
    train(make_config(tmp_path / "w", other, **overrides))


@pytest.mark.slow
def test_resume_past_a_damaged_newest_step(trained, tmp_path, data_dir, caplog):  # noqa: F811
  # Step 2 damaged: the resume warns, restores step 1 (num_steps=1, a safe change: no step runs)
  # and drops step 2's metrics row.
  from recllm_jax.train.loop import train

  workdir, overrides = trained
  shutil.copytree(workdir, tmp_path / "w")
  _truncate_arrays(tmp_path / "w" / "checkpoints" / "2")
  with caplog.at_level(logging.INFO):
    train(make_config(tmp_path / "w", data_dir, **{**overrides, "train.num_steps": 1}))
  assert re.search(r"checkpoint 2 in .* is damaged and is skipped \(ValueError: ", caplog.text)
  assert "resuming from checkpoint 1, the newest intact one (damaged: 2)" in caplog.text
  assert "resuming with changed config keys (safe): train.num_steps 2 -> 1" in caplog.text
  assert [r["step"] for r in read_metrics(tmp_path / "w")] == [1]


# --- kill -9 during a save, through scripts/train.py -------------------------------------------

# Saves at 3, 6, 9 (due) and 10 (the final, forced one). Each run is killed as the save of one
# step starts (asynchronous, the default: the temporary directory exists and the state write is
# in flight), and the next run must resume from the newest complete step:
# (the save killed, the newest complete step it leaves).
KILL_RUN = {"train.num_steps": 10, "train.checkpoint_every": 3}
KILLS = [(6, 3), (9, 6), (10, 9)]


@pytest.mark.slow  # ~55 s: five subprocess runs
def test_kill_during_a_save_resumes_from_the_last_complete_step(tmp_path, data_dir):  # noqa: F811
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from recllm_jax.train.build import _checkpoint_step
  from recllm_jax.train.checkpoint import FAULT_KILL_AT_SAVE, finalized_steps

  ref, killed = tmp_path / "ref", tmp_path / "killed"
  with open(tmp_path / "reference.log", "w") as log:  # the uninterrupted run, alongside
    reference = subprocess.Popen(_cli(ref, data_dir, **KILL_RUN), env=_env(), stdout=log,
                                 stderr=log)
  checkpoints, resume_from = killed / "checkpoints", None
  for kill_at, complete in [*KILLS, (None, None)]:
    env = _env()
    if kill_at is not None:
      env[FAULT_KILL_AT_SAVE] = str(kill_at)
    proc = subprocess.run(_cli(killed, data_dir, **KILL_RUN), env=env, capture_output=True,
                          text=True)
    log = proc.stderr
    assert proc.returncode == (-signal.SIGKILL if kill_at else 0), log[-3000:]
    assert "Traceback" not in log and "is damaged" not in log, log[-3000:]
    restored = re.findall(r"restored checkpoint (\d+) from", log)
    assert restored == ([str(resume_from)] if resume_from else []), log[-3000:]
    if kill_at is not None:
      # The partial step is on disk but no reader counts it: the step before is the latest.
      assert (checkpoints / f"{kill_at}.orbax-checkpoint-tmp").is_dir(), os.listdir(checkpoints)
      assert finalized_steps(killed)[-1] == _checkpoint_step(killed, None)[1] == complete
      resume_from = complete
  assert reference.wait() == 0, (tmp_path / "reference.log").read_text()[-2000:]

  # Each rerun wrote the killed step again over its partial directory: none is left.
  assert sorted(os.listdir(checkpoints)) == ["10", "6", "9"]  # keep_checkpoints=3
  assert finalized_steps(killed) == finalized_steps(ref) == [6, 9, 10]
  # Every step's row once (the rows past each resumed step were dropped, then written again).
  got, expected = read_metrics(killed), read_metrics(ref)
  assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 11))
  assert [r["loss"] for r in got] == [r["loss"] for r in expected]
  # The final params, optimizer moments, step and RNG equal the uninterrupted run's, bit for bit.
  a, b = (jax.tree.leaves(ocp.PyTreeCheckpointer().restore(
      (w / "checkpoints" / "10" / "state").absolute())) for w in (killed, ref))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
