"""scripts/reproduce.sh and scripts/demo.sh: the checks that run before any stage (seconds, no
training). The pipeline itself is run by hand (docs/results.md): it takes minutes to an hour."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _reproduce(tmp_path: Path, data_dir: Path, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), str(data_dir),
                         str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                        env={**os.environ, **env})


@pytest.mark.parametrize("script", ["reproduce.sh", "demo.sh"])
def test_scripts_parse(script):
  done = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr


def _says_what_the_folder_must_hold(done: subprocess.CompletedProcess, problem: str) -> None:
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert lines[0].startswith(f"error: {problem}. DATA_DIR must be an Amazon-2018-format folder")
  assert len(lines) <= 12, done.stderr  # a few lines, not a wall
  text = done.stderr
  for needed in ("items.json", "valid.csv", "test.csv", "info.txt", "optional",  # the layout
                 "published valid/test splits of the MiniOneRec repository, data/Amazon/",
                 "Office_Products", "docs/data.md", "catalog.jsonl + interactions.jsonl",
                 "FORMAT=jsonl bash scripts/reproduce.sh YOUR_DIR", "bash scripts/demo.sh"):
    assert needed in text, needed
  assert done.stdout == ""


def test_a_folder_without_the_amazon_files_says_what_it_must_hold(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "items.json").write_text("{}")
  done = _reproduce(tmp_path, tmp_path / "data")
  _says_what_the_folder_must_hold(done, f"{tmp_path / 'data'} has no valid.csv, test.csv")
  assert not (tmp_path / "out").exists()  # nothing started


def test_a_missing_folder_says_what_it_must_hold(tmp_path):
  # As a fresh clone without ../shared runs it: no folder at all.
  done = subprocess.run(["bash", "scripts/reproduce.sh", "/nonexistent", str(tmp_path / "x")],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
  _says_what_the_folder_must_hold(done, "/nonexistent does not exist")
  assert not (tmp_path / "x").exists()


def test_the_last_line_names_the_command_and_the_outputs(tmp_path):
  # Every stage stubbed (an interpreter that does nothing): the shell's own ending, in a second.
  stub = tmp_path / "python"
  stub.write_text("#!/bin/sh\nexit 0\n")
  stub.chmod(0o755)
  out = tmp_path / "demo"
  done = subprocess.run(["bash", "scripts/demo.sh", str(out)], capture_output=True, text=True,
                        timeout=60, cwd=REPO, env={**os.environ, "PYTHON": str(stub)})
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert lines[-2].startswith("stage times: sids ") and "stage_times.json" in lines[-2]
  assert lines[-1].startswith(f"bash scripts/demo.sh {out}: done in 0 min ")
  assert lines[-1].endswith(f"outputs in {out}/ (results.json, results.png; sft/, grpo/, "
                            "baselines/: checkpoints, curves, predictions)")
  assert json.loads((out / "stage_times.json").read_text())["total"] >= 0
  done = subprocess.run(["bash", "scripts/reproduce.sh", str(out / "sft" / "data"), str(out)],
                        capture_output=True, text=True, timeout=60, cwd=REPO,
                        env={**os.environ, "PYTHON": str(stub), "FORMAT": "synthetic"})
  assert done.stdout.strip().splitlines()[-1].startswith(
      f"bash scripts/reproduce.sh {out / 'sft' / 'data'} {out}: done in 0 min ")


def test_an_unknown_item_format_is_a_one_line_error(tmp_path):
  done = _reproduce(tmp_path, tmp_path, ITEM_FORMAT="titles")
  assert done.returncode == 2
  assert done.stderr.strip() == "error: ITEM_FORMAT=titles; expected sid or title"


@pytest.mark.parametrize("sids", ["built", "data"])
def test_every_stage_reads_the_sids_the_run_chose(tmp_path, sids):
  # A stub interpreter that records its arguments: which SIDs each stage is told to read.
  log = tmp_path / "calls.txt"
  stub = tmp_path / "python"
  stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
  stub.chmod(0o755)
  data = tmp_path / "data"
  data.mkdir()
  for name in ("items.json", "valid.csv", "test.csv", "info.txt"):
    (data / name).write_text("")
  done = _reproduce(tmp_path, data, PYTHON=str(stub), SIDS=sids)
  assert done.returncode == 0, done.stderr
  calls = log.read_text().splitlines()
  sid_file = f"--config.data.sid_file={tmp_path / 'out' / 'sids.tsv'}"
  runs = [c for c in calls if c.startswith(("scripts/train.py", "scripts/evaluate.py"))]
  assert len(runs) == 6  # SFT, GRPO, two evaluations, two CF-guided ones
  if sids == "built":
    assert calls[0].startswith(f"scripts/build_sids.py --data_dir {data} --format amazon18 "
                               f"--out {tmp_path / 'out' / 'sids.tsv'}")
    assert all(sid_file in c for c in runs)
  else:
    assert "semantic IDs: the dataset's own" in done.stdout and f"{data}/info.txt" in done.stdout
    assert not any("build_sids.py" in c or "sid_file" in c for c in calls)
  assert _reproduce(tmp_path, data, PYTHON=str(stub), SIDS="mine").stderr.strip() == \
      "error: SIDS=mine; expected built or data"
