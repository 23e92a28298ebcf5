"""The `office` presets end to end on the real Amazon data, as scripts/reproduce.sh runs them:
SFT (semantic IDs, whole user sequences) -> GRPO (beam rollouts) -> evaluation, a few steps each.
Skipped when ../shared/data/amazon18/Office_Products is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OFFICE = (REPO / ".." / "shared" / "data" / "amazon18" / "Office_Products").resolve()

# slow: three processes, ~30 s on an idle 2-core machine (`pytest -m slow`).
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (OFFICE / "valid.csv").is_file(),
                                 reason="Amazon Office_Products data not available")]


def _run(script: str, preset: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  cmd = [sys.executable, str(REPO / "scripts" / script), "--config",
         f"{REPO / 'configs' / preset}", f"--config.data.dir={OFFICE}", *args]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_office_presets_train_and_evaluate_with_semantic_ids(tmp_path):
  sft, grpo = tmp_path / "sft", tmp_path / "grpo"
  _run("train.py", "sft.py:office", f"--config.workdir={sft}", "--config.train.num_steps=2",
       "--config.train.batch_size=8", "--config.train.eval_every=0")
  examples = (sft / "train_examples.txt").read_text()
  assert "Reply with the exact semantic ID of the item" in examples
  assert "trained history tokens in [[ ]]" in examples and "[[<a_" in examples
  # The history comes last, one bare SID a line: the answer follows the newest item's line.
  assert "]]\n<｜Assistant｜>" in examples and "\n1. <a_" not in examples
  _run("train.py", "grpo.py:office", f"--config.workdir={grpo}", f"--config.init_from={sft}",
       "--config.train.num_steps=1", "--config.grpo.num_generations=4",
       "--config.train.batch_size=2", "--config.train.eval_every=0")
  rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["parse/ok"] == 8 and rows[0]["frac_valid"] == 1.0  # beams are always items
  _run("evaluate.py", "grpo.py:office", f"--config.workdir={grpo}", f"--config.init_from={sft}",
       "--split=test", "--max_examples=8", "--k=5")
  metrics = json.loads((grpo / "eval_test.json").read_text())
  assert metrics["valid_rate"] == 1.0 and 0.0 <= metrics["hr@5"] <= 1.0
  predictions = [json.loads(line) for line in (grpo / "predictions_test.jsonl").read_text()
                 .splitlines()]
  assert len(predictions) == 8 and all(len(set(p["ranked"])) == 5 for p in predictions)
