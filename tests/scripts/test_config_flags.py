"""The `--config` override grammar of scripts/train.py (shared by evaluate.py, baselines.py,
plan.py): every mistake is one line `error: ...` and exit status 2, never a traceback.

The parse step runs in-process on a fresh `FlagValues` (milliseconds a case); one subprocess
checks that the real entry point wires it up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import train as train_script  # noqa: E402  (scripts/train.py: parse_flags, load_config, fail)

SFT = str(REPO / "configs" / "sft.py")


def _parse(monkeypatch, config: str | None, *args: str):
  """parse_flags + load_config as scripts/train.py runs them, on a fresh FlagValues."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  lock_config=True)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)
  config = None if config is None else str(REPO / "configs" / config)
  argv = ["train.py", *([] if config is None else ["--config", config]), *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  train_script.parse_flags(argv, flag_values)
  return train_script.load_config(flag_values)


@pytest.mark.parametrize("config, args, message", [
    # A key under a missing parent: was an ml_collections KeyError traceback, exit 1.
    ("sft.py:tiny", ["--config.model.nosuch.rank=8"],
     "--config.model.nosuch.rank=8: no such config key 'model.nosuch'"),
    ("sft.py:tiny", ["--config.nosuch.a.b=1"],
     "--config.nosuch.a.b=1: no such config key 'nosuch'"),
    ("sft.py:tiny", ["--config.modle.lora.rank=8"],
     "no such config key 'modle'. Did you mean \"model\""),
    ("sft.py:tiny", ["--noconfig.model.nosuch.flag"], "no such config key 'model.nosuch'"),
    # A key below a plain value.
    ("sft.py:tiny", ["--config.train.lr.x=1"],
     "--config.train.lr.x=1: no such config key; train.lr is a float"),
    # Unknown leaf keys, at the top and nested.
    ("sft.py:tiny", ["--config.train.num_stepz=3"],
     '--config.train.num_stepz=3: no such config key. Did you mean "num_steps"'),
    ("sft.py:tiny", ["--config.nosuch=8"], "--config.nosuch=8: no such config key"),
    # Values of the wrong type.
    ("sft.py:tiny", ["--config.train.lr=abc"], "--config.train.lr=abc: could not convert"),
    ("sft.py:tiny", ["--config.train.num_steps=1.5"], "--config.train.num_steps=1.5: invalid"),
    ("sft.py:tiny", ["--config.train.num_steps="], "--config.train.num_steps=: invalid"),
    ("sft.py:tiny", ["--config.train.async_checkpoint=maybe"], "Non-boolean argument"),
    ("sft.py:tiny", ["--config.train=3"], "--config.train=3: Failed to parse '3'"),
    ("sft.py:tiny", ["--config.train.num_steps"],
     "Missing value for flag --config.train.num_steps"),
    # Presets and config files.
    ("sft.py:nosuch", [], "--config: unknown preset 'nosuch' for"),
    ("nosuch.py", [], "nosuch.py: [Errno 2] No such file or directory"),
    ("nosuch.py:tiny", ["--config.workdir=/tmp/w"],
     "nosuch.py: [Errno 2] No such file or directory"),
    ("", ["--config.workdir=/tmp/w"], "Is a directory"),
    (None, [], "Flag --config must have a value other than None"),
    # Flags that are not overrides, and overrides before --config.
    ("sft.py:tiny", ["--confg.train.lr=1"], "Unknown command line flag 'confg.train.lr'"),
    ("sft.py:tiny", ["--bogus"], "Unknown command line flag 'bogus'"),
])
def test_override_grammar_errors_are_one_line_with_status_2(monkeypatch, capsys, config, args,
                                                            message):
  with pytest.raises(SystemExit) as exit_info:
    _parse(monkeypatch, config, *args)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  assert message in err, err


def test_valid_overrides_parse(monkeypatch):
  config = _parse(monkeypatch, "sft.py:tiny", "--config.train.num_steps=7",
                  "--config.model.lora.rank=4", "--config.train.lr=1e-3")
  assert (config.train.num_steps, config.model.lora.rank, config.train.lr) == (7, 4, 1e-3)


def test_train_py_reports_a_key_under_a_missing_parent_in_one_line(tmp_path):
  """The real entry point (absl's app.run with parse_flags): exit 2, no traceback."""
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), "--config", SFT + ":tiny",
       f"--config.workdir={tmp_path}", "--config.model.nosuch.rank=8"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == "error: --config.model.nosuch.rank=8: no such config key 'model.nosuch'.\n"
