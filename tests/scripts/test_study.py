"""scripts/study.py: arms x seeds, GRPO after its own SFT run, resume, failures, the table.

The training and evaluation commands are replaced by a fake that writes the eval file a real
run would, so these tests check the orchestration in milliseconds; a real study is run by hand
(docs/results.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import study  # noqa: E402


def _flag(cmd: list[str], name: str) -> str:
  return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--config.{name}="))


@pytest.fixture
def fake_runs(monkeypatch):
  """Every train/eval command, in order; eval writes ndcg@10 = 0.1 * (seed + 1) for SFT and
  1.1x its SFT's for GRPO (hr@10 = 2 x ndcg@10); a workdir whose name holds 'bad' fails."""
  calls = []

  def fake_call(cmd, log, env, deadline=math.inf):
    calls.append(cmd)
    workdir = Path(_flag(cmd, "workdir"))
    if "bad" in workdir.name:
      raise RuntimeError(f"exit 1: boom (log: {log})")
    if cmd[1].endswith("evaluate.py"):
      ndcg = 0.1 * (int(_flag(cmd, "seed")) + 1) * (1.1 if workdir.name.startswith("grpo") else 1)
      split = cmd[cmd.index("--split") + 1]
      (workdir / f"eval_{split}.json").write_text(json.dumps({"ndcg@10": ndcg,
                                                               "hr@10": 2 * ndcg}))
  monkeypatch.setattr(study, "_call", fake_call)
  return calls


def test_parse_arm():
  assert study.parse_arm("d2 model.dropout=0.2 data.align_tasks=title2item,item2title") == \
      study.Arm("d2", ("model.dropout=0.2", "data.align_tasks=title2item,item2title"))
  assert study.parse_arm("mo config=configs/grpo.py:minionerec grpo.beta=0") == \
      study.Arm("mo", ("grpo.beta=0",), "configs/grpo.py:minionerec")
  with pytest.raises(ValueError, match="not key=value"):
    study.parse_arm("d2 --config.model.dropout=0.2")
  with pytest.raises(ValueError, match="arm name"):
    study.parse_arm("a/b")


def test_grpo_continues_its_own_seeds_sft_and_the_table_has_hand_computed_values(
    tmp_path, fake_runs, capsys):
  out = tmp_path / "study"
  argv = ["--out", str(out), "--set", "data.dir=/d", "--sft_arm", "base",
          "--sft_arm", "d2 model.dropout=0.2", "--grpo_arm", "g lr=1 config=configs/grpo.py:x",
          "--seeds", "0,1"]
  assert study.main(argv) == 0
  train = [c for c in fake_runs if c[1].endswith("train.py")]
  assert len(train) == 8  # 2 arms x 2 seeds x (SFT + GRPO)
  for cmd in train:
    assert "--config.data.dir=/d" in cmd
    assert cmd[3] == ("configs/grpo.py:x" if Path(_flag(cmd, "workdir")).name != "sft"
                      else "configs/sft.py:office")
    if _flag(cmd, "workdir").endswith("grpo_g"):
      # The GRPO run of seed S starts from the SFT run of the same arm and seed.
      assert _flag(cmd, "init_from") == str(Path(_flag(cmd, "workdir")).parent / "sft")
      assert f"seed{_flag(cmd, 'seed')}" in _flag(cmd, "init_from")
  rows = {line.split(" | ")[0].strip("| "): line for line in
          (out / "study.md").read_text().splitlines()}
  # SFT ndcg@10: 0.1, 0.2 -> mean 0.15, se = stdev / sqrt(2) = 0.0707107 / 1.414 = 0.05.
  assert "0.1500 +- 0.0500" in rows["base"]
  assert "0.3000 +- 0.1000" in rows["base"]  # hr@10 = 2 x
  # GRPO: 1.1x its own SFT for each seed.
  assert "1.100 1.100; 1.100, 1.100" in rows["base -> grpo g"]
  runs = json.loads((out / "study.json").read_text())["runs"]
  assert len(runs) == 8 and not any(r["error"] for r in runs)

  # A second call finds every eval file and runs nothing again.
  fake_runs.clear()
  assert study.main(argv) == 0
  assert fake_runs == []


def test_a_failed_sft_run_skips_its_grpo_runs_and_the_others_go_on(tmp_path, fake_runs):
  out = tmp_path / "study"
  code = study.main(["--out", str(out), "--sft_arm", "ok", "--grpo_arm", "bad",
                     "--grpo_arm", "g", "--seeds", "0"])
  assert code == 1
  runs = {Path(r["workdir"]).name: r for r in json.loads((out / "study.json").read_text())["runs"]}
  assert runs["grpo_bad"]["error"].startswith("exit 1: boom")
  assert runs["grpo_g"]["metrics"]["ndcg@10"] == pytest.approx(0.11)


def test_timeout_skips_what_has_not_started(tmp_path, fake_runs):
  out = tmp_path / "study"
  args = ["--out", str(out), "--seeds", "0,1", "--timeout", "1e-9"]
  assert study.main(args) == 1
  assert fake_runs == []
  runs = json.loads((out / "study.json").read_text())["runs"]
  assert [r["error"] for r in runs] == ["not run: the study's --timeout had passed"] * 2


def test_arm_names_must_differ(capsys):
  with pytest.raises(SystemExit):
    study.parse_args(["--out", "x", "--sft_arm", "a", "--sft_arm", "a model.dropout=0.1"])
  assert "names repeat" in capsys.readouterr().err
