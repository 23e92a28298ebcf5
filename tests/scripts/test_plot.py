"""recllm_jax.plots and scripts/plot.py: which curves a run gets, valid PNGs, one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from recllm_jax.data.errors import DataError
from recllm_jax.errors import MissingPathError
from recllm_jax.plots import (PENALTY_KEY, bar_chart, bar_chart_figure, curves, loss_title,
                               plot_metrics, read_metrics)

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# As the loop logs them: train rows every log step, evaluation rows of their own.
SFT_ROWS = [{"step": 10, "loss": 2.5, "tokens_per_sec": 900.0},
            {"step": 20, "loss": 2.0, "tokens_per_sec": 910.0},
            {"step": 20, "val_loss": 2.25}]
GRPO_ROWS = [{"step": 1, "loss": 0.1, "reward": 0.5, "reward/format": 1.0, "reward/hit": 0.0,
              "kl": 0.0, "completion_len": 40.0},
             {"step": 2, "loss": -0.2, "reward": 0.75, "reward/format": 1.0, "reward/hit": 0.5,
              "kl": 0.01, "completion_len": 36.0},
             {"step": 2, "val_reward": 0.6, "val_reward/hit": 0.2, "val_frac_valid": 1.0}]


def write_metrics(workdir: Path, rows: list[dict]) -> Path:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return workdir


def png_size(path: Path) -> tuple[int, int]:
  """(width, height) from the IHDR chunk, after checking the PNG signature."""
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE, path
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_curves_select_the_logged_keys_per_plot():
  assert curves(SFT_ROWS) == {"loss": {"loss": ([10, 20], [2.5, 2.0]),
                                       "val_loss": ([20], [2.25])}}
  drawn = curves(GRPO_ROWS)
  assert list(drawn) == ["loss", "reward", "kl", "completion_len"]
  assert list(drawn["reward"]) == ["reward", "val_reward", "reward/format", "reward/hit",
                                   "val_reward/hit"]
  assert drawn["reward"]["reward/hit"] == ([1, 2], [0.0, 0.5])
  assert drawn["reward"]["val_reward/hit"] == ([2], [0.2])
  assert drawn["kl"] == {"kl": ([1, 2], [0.0, 0.01])}
  assert drawn["completion_len"] == {"completion_len": ([1, 2], [40.0, 36.0])}


@pytest.mark.parametrize("rows, expected", [
    (SFT_ROWS, {"loss": 1}),
    (GRPO_ROWS, {"loss": 1, "reward": 2, "kl": 1, "completion_len": 1}),  # name: panels
])
def test_plot_metrics_writes_one_png_per_logged_curve(tmp_path, rows, expected):
  workdir = write_metrics(tmp_path / "run", rows)
  paths = plot_metrics(workdir)
  assert paths == [workdir / f"{name}.png" for name in expected]
  assert sorted(p.name for p in workdir.glob("*.png")) == sorted(f"{n}.png" for n in expected)
  for path, panels in zip(paths, expected.values()):
    assert png_size(path) == (700 * panels, 400)  # 7 x 4 inches a panel at 100 dpi


def test_read_errors_name_the_file_and_line(tmp_path):
  with pytest.raises(MissingPathError, match="metrics.jsonl not found"):
    plot_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss":\n')
  with pytest.raises(DataError, match=r"metrics.jsonl:3: not valid JSON"):
    plot_metrics(tmp_path)
  # Without its newline the same row is one the run is still writing: plotted without it.
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss":')
  assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n["step", 2]\n')
  with pytest.raises(DataError, match=r"metrics.jsonl:2: expected an object with an integer"):
    plot_metrics(tmp_path)
  write_metrics(tmp_path, [{"step": 1, "tokens_per_sec": 5.0}])
  with pytest.raises(DataError, match=r"no plottable metrics.*logged \['tokens_per_sec'\]"):
    plot_metrics(tmp_path)


def test_grpo_loss_plot_splits_the_terms_and_says_which_dominates(tmp_path):
  # As GRPO logs them: loss = pg_loss + beta * KL; pg_loss ~0 (group-centred advantages).
  rows = [{"step": s, "loss": 1e-5 * s + 1e-8, "pg_loss": 1e-8, "kl": 0.01 * s, "reward": 0.5}
          for s in (1, 2, 3)]
  drawn = curves(rows)["loss"]
  assert list(drawn) == ["loss", "pg_loss", PENALTY_KEY]
  assert drawn[PENALTY_KEY][0] == [1, 2, 3]
  assert drawn[PENALTY_KEY][1] == pytest.approx([1e-5, 2e-5, 3e-5])
  title = loss_title(drawn, grpo=True)
  assert title.startswith("GRPO loss = policy-gradient term + KL penalty\n")
  assert "the KL penalty dominates (mean size: KL 2e-05, pg 1e-08)" in title
  flipped = [{**r, "pg_loss": 0.5, "loss": 0.5 + 1e-5} for r in rows]
  assert "the policy-gradient term dominates" in loss_title(curves(flipped)["loss"], grpo=True)
  even = [{**r, "pg_loss": 1e-5, "loss": 2e-5} for r in rows]
  assert "neither term dominates" in loss_title(curves(even)["loss"], grpo=True)
  assert loss_title(curves(SFT_ROWS)["loss"], grpo=False).startswith("SFT loss: mean cross-")
  path = plot_metrics(write_metrics(tmp_path / "run", rows))[0]
  assert path.name == "loss.png" and png_size(path) == (700, 400)  # the terms share one panel


def test_bar_chart_is_one_panel_per_metric_in_a_grid(tmp_path):
  names = ["sft", "grpo", "grpo+cf", "markov", "popularity", "sasrec", "published D3", "x"]
  metrics = ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20"]
  results = {n: {m: 0.1 * i + 0.01 * j for j, m in enumerate(metrics)}
             for i, n in enumerate(names)}
  fig = bar_chart_figure(results, metrics=metrics, title="demo")
  shown = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in shown] == metrics  # one panel each, in order
  assert all(len(ax.patches) == len(names) for ax in shown)  # one bar per entry
  assert fig.get_size_inches() == pytest.approx((13.5, 0.4 + 2 * (1.0 + 0.3 * len(names))))
  path = bar_chart(results, tmp_path / "results.png", metrics=metrics)
  assert png_size(path) == (1350, 720)  # 3 x 2 panels, not the old 2520 x 400 strip
  # Fewer metrics than columns: one row, no empty panels.
  fig = bar_chart_figure(results, metrics=["hr@10", "ndcg@10"])
  assert sum(ax.get_visible() for ax in fig.axes) == 2
  assert fig.get_size_inches()[0] == pytest.approx(9.5)


def test_bar_chart_of_models_vs_baselines(tmp_path):
  results = {"GRPO": {"hr@10": 0.12, "ndcg@10": 0.07}, "SFT": {"hr@10": 0.09, "ndcg@10": 0.05},
             "Popularity": {"hr@10": 0.03}}  # a baseline without ndcg gets no bar there
  path = bar_chart(results, tmp_path / "charts" / "results.png", metrics=("hr@10", "ndcg@10"),
                   title="Office_Products")
  assert path.parent.name == "charts" and png_size(path) == (950, 230)
  fig = bar_chart_figure(results, metrics=("hr@10", "ndcg@10"))
  assert [len(ax.patches) for ax in fig.axes] == [3, 2]
  with pytest.raises(ValueError, match=r"\['recall@5'\] are not reported"):
    bar_chart(results, tmp_path / "bad.png", metrics=("hr@10", "recall@5"))
  assert not (tmp_path / "bad.png").exists()


def _plot_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / "plot.py"), *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_the_paths_and_fails_in_one_line(tmp_path):
  workdir = write_metrics(tmp_path / "run", GRPO_ROWS)
  done = _plot_cli("--workdir", str(workdir))
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == [str(workdir / f"{n}.png")
                                 for n in ("loss", "reward", "kl", "completion_len")]

  done = _plot_cli("--workdir", str(tmp_path / "empty"))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: MissingPathError: {tmp_path / 'empty' / 'metrics.jsonl'} not found: no metrics "
      "were logged there (is it a run's workdir, and has the run logged a step?)"]
