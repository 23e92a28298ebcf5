"""Training curves from a run's metrics.jsonl, and result bar charts, as PNG files.

`metrics.jsonl` is the one record every run writes (TensorBoard is optional), so these plots
work on a headless machine and can go straight into a report. Figures are built with
`matplotlib.figure.Figure` on the Agg canvas rather than through `pyplot`: no global backend
switch and no display needed, and importing this module from a notebook leaves its backend alone.

Which curves exist depends on the task: SFT logs `loss` (and `val_loss` at evaluations), GRPO
logs `reward`, `reward/<name>` per reward function, `kl`, `completion_len` (and `val_reward`,
`val_reward/<name>`). A plot is drawn only when the run logged one of its keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from recllm_jax.data.errors import DataError
from recllm_jax.errors import MissingPathError

METRICS_FILE = "metrics.jsonl"

Series = tuple[list[int], list[float]]  # (steps, values) of one key


@dataclasses.dataclass(frozen=True)
class Curve:
  """One PNG: the keys it draws (exact names, then every `<prefix><name>` in first-seen order)."""

  name: str  # file stem: <name>.png
  title: str
  ylabel: str
  keys: tuple[str, ...]
  prefixes: tuple[str, ...] = ()

  def select(self, keys: Sequence[str]) -> list[str]:
    """The keys of this curve among `keys` (a run's keys in first-seen order)."""
    exact = [k for k in self.keys if k in keys]
    return exact + [k for k in keys if k.startswith(self.prefixes)]  # () matches nothing


CURVES = (
    Curve("loss", "Loss", "loss", ("loss", "val_loss")),
    Curve("reward", "Reward", "reward", ("reward", "val_reward"),
          prefixes=("reward/", "val_reward/")),
    Curve("kl", "KL to the reference policy", "KL", ("kl",)),
    Curve("completion_len", "Completion length", "tokens", ("completion_len",)),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl; a missing file or a malformed line is a user error (except an
  unfinished last line: the run may be writing it right now)."""
  path = Path(path)
  if not path.is_file():
    raise MissingPathError(f"{path} not found: no metrics were logged there (is it a run's "
                           "workdir, and has the run logged a step?)")
  text = path.read_text()
  lines = text.splitlines()
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not text.endswith("\n"):
        break  # a row the running job is still writing
      raise DataError(f"not valid JSON ({e.msg})", path=path, line=number) from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise DataError("expected an object with an integer 'step'", path=path, line=number)
    rows.append(row)
  return rows


def series(rows: Sequence[Mapping[str, Any]], key: str) -> Series:
  """(steps, values) of the rows that logged a number under `key`."""
  points = [(row["step"], float(row[key])) for row in rows
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
  return [s for s, _ in points], [v for _, v in points]


def curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Series]]:
  """{curve name: {key: series}} for every curve of CURVES that has at least one logged key."""
  keys = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order, no duplicates
  out = {}
  for curve in CURVES:
    drawn = {k: series(rows, k) for k in curve.select(keys)}
    drawn = {k: s for k, s in drawn.items() if s[0]}
    if drawn:
      out[curve.name] = drawn
  return out


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)  # renders PNGs without pyplot's global backend
  return fig


def _draw_lines(ax: Any, drawn: Mapping[str, Series], title: str) -> None:
  """One line per key; a key and its `val_` twin share a color, the held-out one dashed with dots
  (evaluations are sparse). With many lines the twins leave the legend and the title says so."""
  bases = list(dict.fromkeys(k.removeprefix("val_") for k in drawn))
  palette = matplotlib.colormaps["tab10" if len(bases) <= 10 else "tab20"].colors
  twins_in_legend = len(bases) <= 4
  for key, (steps, values) in drawn.items():
    base = key.removeprefix("val_")
    held_out = key != base
    label = key if twins_in_legend or not held_out or base not in drawn else "_nolegend_"
    ax.plot(steps, values, label=label, color=palette[bases.index(base) % len(palette)],
            linestyle="--" if held_out else "-",
            marker="o" if held_out or len(steps) == 1 else None, markersize=3)
  if not twins_in_legend and any(k.startswith("val_") for k in drawn):
    title += " (dashed: held-out)"
  ax.set(xlabel="step", title=title)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, never 1.5
  ax.grid(alpha=0.3)
  if twins_in_legend:
    ax.legend(fontsize="small")
  else:  # many lines (one per reward component): beside the plot, not over it
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_curve(curve: Curve, drawn: Mapping[str, Series], path: Path, suptitle: str) -> Path:
  """`drawn` on one panel, or with the prefixed keys (reward components) on a second."""
  main = {k: s for k, s in drawn.items() if k in curve.keys}
  parts = {k: s for k, s in drawn.items() if k not in curve.keys}
  panels = [(title, group) for title, group in ((curve.title, main),
                                                 (f"{curve.title} components", parts)) if group]
  fig = _figure(width=7.0 * len(panels) + (2.0 if len(parts) > 4 else 0.0))
  for i, (title, group) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    _draw_lines(ax, group, title)
    ax.set_ylabel(curve.ylabel)
  fig.suptitle(suptitle, fontsize="small")
  fig.savefig(path, format="png", dpi=100)
  return path


def plot_metrics(workdir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
  """Draws CURVES from `<workdir>/metrics.jsonl` into `<out_dir or workdir>/<curve>.png`.

  Returns the paths written (in CURVES order); a run with none of the keys is a user error.
  """
  workdir = Path(workdir)
  metrics_path = workdir / METRICS_FILE
  rows = read_metrics(metrics_path)
  drawn = curves(rows)
  if not drawn:
    logged = sorted({k for row in rows for k in row} - {"step"})
    known = sorted({k for c in CURVES for k in c.keys} | {f"{p}<name>" for c in CURVES
                                                           for p in c.prefixes})
    raise DataError(f"no plottable metrics: expected any of {known}, the run logged {logged}",
                    path=metrics_path)
  out = Path(out_dir) if out_dir is not None else workdir
  out.mkdir(parents=True, exist_ok=True)
  by_name = {c.name: c for c in CURVES}
  return [_draw_curve(by_name[name], series_, out / f"{name}.png", str(workdir))
          for name, series_ in drawn.items()]


def bar_chart(results: Mapping[str, Mapping[str, float]], path: str | Path, *,
              metrics: Sequence[str] | None = None, title: str = "") -> Path:
  """Grouped bars of models vs baselines: one group per metric, one bar per entry of `results`.

  `results` is {name: {metric: value}} (e.g. {"GRPO": {"hr@10": 0.12}, "SASRec": {...}});
  `metrics` defaults to every metric in first-seen order. A name without a metric gets no bar
  (baselines may not report every metric); a metric that no name reports is an error.
  """
  if not results:
    raise ValueError("bar_chart needs at least one entry in results")
  if metrics is None:
    metrics = list(dict.fromkeys(m for values in results.values() for m in values))
  missing = [m for m in metrics if not any(m in values for values in results.values())]
  if missing or not metrics:
    raise ValueError(f"metrics {missing or list(metrics)} are not reported by any of "
                     f"{list(results)}")
  names = list(results)
  width = 0.8 / len(names)
  fig = _figure(width=max(5.0, 1.2 + 0.5 * len(names) * len(metrics)))
  ax = fig.add_subplot()
  for i, name in enumerate(names):
    xs = [j + (i - (len(names) - 1) / 2) * width for j, m in enumerate(metrics)
          if m in results[name]]
    values = [float(results[name][m]) for m in metrics if m in results[name]]
    bars = ax.bar(xs, values, width, label=name, color=f"C{i % 10}")
    ax.bar_label(bars, labels=[f"{v:.3f}" if math.isfinite(v) else "nan" for v in values],
                 fontsize="x-small", rotation=90 if len(names) > 4 else 0, padding=2)
  ax.set_xticks(range(len(metrics)), list(metrics))
  ax.set(ylabel="value", title=title)
  ax.margins(y=0.15)  # room for the value labels above the tallest bar
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize="small")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)
  return path


__all__ = ["CURVES", "Curve", "METRICS_FILE", "bar_chart", "curves", "plot_metrics",
           "read_metrics", "series"]
