"""What a newcomer meets first in the config-driven scripts (train.py, evaluate.py, plan.py):
help that exits 0 and lists the presets, `--print_config`, every independent config error at
once, and a mistyped synthetic `data.dir` refused instead of filled with generated data.

Help and `--print_config` stop before JAX is imported, so each subprocess takes well under a
second; the error list runs the start-up checks (about 2 s).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import train as train_script  # noqa: E402  (scripts/train.py)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True,
                        text=True, timeout=120, cwd=REPO)


def _preset_names(path: Path) -> list[str]:
  """The PRESETS keys of a config file, read independently of train.config_presets."""
  module = ast.parse(path.read_text())
  for node in module.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRESETS":
      return [k.value for k in node.value.keys if k.value]
  return []


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "plan.py"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_flags_and_every_preset(script, flag):
  proc = _run(script, flag)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "--config:" in out and "--print_config:" in out, out
  for path in (REPO / "configs").glob("*.py"):
    for name in _preset_names(path):
      line = next((l for l in out.splitlines() if f"configs/{path.name}:{name} " in l), None)
      assert line is not None, f"preset {path.name}:{name} missing from {script} {flag}"
      assert "not described" not in line, line
  if script == "evaluate.py":
    assert "--split:" in out and "--cf_model:" in out  # the script's own flags too


def test_config_presets_reads_names_and_summaries(tmp_path):
  config = tmp_path / "c.py"
  config.write_text('"""Doc.\n\nPresets:\n  a    first one\n  bb   second\n\nMore."""\n'
                    'PRESETS = {"": a, "a": a, "bb": b, "c": c}\n')
  assert train_script.config_presets(config) == [
      ("a", "first one"), ("bb", "second"), ("c", "(not described in the file's docstring)")]


def test_print_config_shows_overrides_and_exits_0():
  proc = _run("train.py", "--config", "configs/sft.py:tiny", "--config.train.lr=0.125",
              "--print_config")
  assert proc.returncode == 0, proc.stderr
  assert "lr: 0.125" in proc.stdout and "num_steps: 300" in proc.stdout, proc.stdout


def test_every_independent_config_error_is_reported_one_line_each(tmp_path):
  """Without a preset (model.preset=hf, no hf_path), a missing data.dir, a batch that does not
  split and a bad profile spec: all four, not only the first."""
  missing = tmp_path / "nonexistent"
  proc = _run("train.py", "--config", "configs/sft.py", f"--config.workdir={tmp_path / 'w'}",
              f"--config.data.dir={missing}", "--config.train.batch_size=7",
              "--config.train.grad_accum_steps=2", "--config.profile.steps=x")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.splitlines()
  assert all(line.startswith("error: ") for line in lines), proc.stderr
  for expected in ("model.hf_path is empty", f"data.dir='{missing}' is not a directory",
                   "train.batch_size=7 must be a positive multiple", "profile.steps='x'"):
    assert sum(expected in line for line in lines) == 1, (expected, proc.stderr)
  assert len(lines) == 4, proc.stderr


def test_synthetic_data_into_a_new_folder_outside_the_workdir_is_refused(tmp_path):
  """A mistyped path to one's own data used to be created and filled with synthetic data."""
  mistyped = tmp_path / "my_dta"
  proc = _run("train.py", "--config", "configs/sft.py:tiny", f"--config.workdir={tmp_path / 'w'}",
              f"--config.data.dir={mistyped}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"error: MissingPathError: data.dir='{mistyped}' does not exist")
  assert "data.format to jsonl" in proc.stderr
  assert proc.stderr.count("\n") == 1
  assert not mistyped.exists()
