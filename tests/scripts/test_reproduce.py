"""scripts/reproduce.sh and scripts/demo.sh: the checks that run before any stage (seconds, no
training). The pipeline itself is run by hand (docs/results.md): it takes minutes to an hour."""

from __future__ import annotations

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


def test_a_folder_without_the_amazon_files_says_what_it_must_hold(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "items.json").write_text("{}")
  done = _reproduce(tmp_path, tmp_path / "data")
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  for needed in ("valid.csv not found", "items.json, valid.csv and test.csv", "info.txt",
                 "MiniOneRec", "data/Amazon/", "docs/data.md"):
    assert needed in lines[0]
  assert not (tmp_path / "out").exists()  # nothing started


def test_an_unknown_item_format_is_a_one_line_error(tmp_path):
  done = _reproduce(tmp_path, tmp_path, ITEM_FORMAT="titles")
  assert done.returncode == 2
  assert done.stderr.strip() == "error: ITEM_FORMAT=titles; expected sid or title"
