"""Training curves from a run's metrics.jsonl, and result bar charts, as PNG files.

`metrics.jsonl` is the one record every run writes (TensorBoard is optional), so these plots
work on a headless machine and can go straight into a report. Figures are built with
`matplotlib.figure.Figure` on the Agg canvas rather than through `pyplot`: no global backend
switch and no display needed, and importing this module from a notebook leaves its backend alone.

Which curves exist depends on the task: SFT logs `loss` (and `val_loss` at evaluations), GRPO
logs `reward`, `reward/<name>` per reward function, `kl`, `completion_len` (and `val_reward`,
`val_reward/<name>`). A plot is drawn only when the run logged one of its keys.

GRPO's `loss` is the policy-gradient term `pg_loss` plus the penalties (`grpo.beta` x KL to the
reference, minus any entropy bonus; `train/policy_loss.py`). When both are logged the loss plot
draws the two terms beside the total (the penalty as `loss - pg_loss`) and its title says which
term dominates: with one update per rollout `pg_loss` is ~0 by construction (group-centred
advantages; its gradient is not 0), so a rising GRPO loss is the KL penalty growing.
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
    # "loss" is retitled per task by loss_title (SFT's cross-entropy, GRPO's two terms).
    Curve("loss", "Loss", "loss", ("loss", "val_loss", "pg_loss")),
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


PG_KEY = "pg_loss"  # GRPO's policy-gradient term (train/policy_loss.py)
PENALTY_KEY = "loss - pg_loss"  # derived: beta * KL minus any entropy bonus
LABELS = {"loss": "loss (total)", PG_KEY: "pg_loss: policy-gradient term",
          PENALTY_KEY: "loss - pg_loss: beta x KL penalty"}
# The total under its terms: wide and pale, so a term that equals it does not hide it.
TOTAL_STYLE = {"linewidth": 5.0, "alpha": 0.35}


def penalty_series(rows: Sequence[Mapping[str, Any]]) -> Series:
  """(steps, loss - pg_loss) of the rows that logged both: GRPO's penalty terms."""
  pg = dict(zip(*series(rows, PG_KEY)))
  steps, losses = series(rows, "loss")
  points = [(s, v - pg[s]) for s, v in zip(steps, losses) if s in pg]
  return [s for s, _ in points], [v for _, v in points]


def curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Series]]:
  """{curve name: {key: series}} for every curve of CURVES that has at least one logged key
  (the loss curve also gets PENALTY_KEY when the run logged `loss` and `pg_loss`)."""
  keys = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order, no duplicates
  out = {}
  for curve in CURVES:
    drawn = {k: series(rows, k) for k in curve.select(keys)}
    drawn = {k: s for k, s in drawn.items() if s[0]}
    if curve.name == "loss" and PG_KEY in drawn and "loss" in drawn:
      drawn[PENALTY_KEY] = penalty_series(rows)
    if drawn:
      out[curve.name] = drawn
  return out


def _mean_abs(values: Sequence[float]) -> float:
  return sum(abs(v) for v in values) / max(len(values), 1)


def loss_title(drawn: Mapping[str, Series], grpo: bool) -> str:
  """The loss plot's title: what the curve is and, for GRPO with both terms, which dominates
  (by mean absolute value over the logged steps; within 2x of each other neither does)."""
  if not grpo:
    return "SFT loss: mean cross-entropy per target token"
  if PENALTY_KEY not in drawn:
    return "GRPO loss (policy-gradient term + KL penalty; pg_loss not logged)"
  pg, penalty = _mean_abs(drawn[PG_KEY][1]), _mean_abs(drawn[PENALTY_KEY][1])
  if penalty > 2 * pg:
    verdict = "the KL penalty dominates"
  elif pg > 2 * penalty:
    verdict = "the policy-gradient term dominates"
  else:
    verdict = "neither term dominates"
  return (f"GRPO loss = policy-gradient term + KL penalty\n{verdict} "
          f"(mean size: KL {penalty:.2g}, pg {pg:.2g})")


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)  # renders PNGs without pyplot's global backend
  return fig


def _draw_lines(ax: Any, drawn: Mapping[str, Series], title: str,
                labels: Mapping[str, str] | None = None) -> None:
  """One line per key; a key and its `val_` twin share a color, the held-out one dashed with dots
  (evaluations are sparse). With many lines the twins leave the legend and the title says so."""
  bases = list(dict.fromkeys(k.removeprefix("val_") for k in drawn))
  palette = matplotlib.colormaps["tab10" if len(bases) <= 10 else "tab20"].colors
  twins_in_legend = len(bases) <= 4
  for key, (steps, values) in drawn.items():
    base = key.removeprefix("val_")
    held_out = key != base
    label = ((labels or {}).get(key, key) if twins_in_legend or not held_out or base not in drawn
             else "_nolegend_")
    style = TOTAL_STYLE if labels and key == "loss" else {}
    ax.plot(steps, values, label=label, color=palette[bases.index(base) % len(palette)],
            linestyle="--" if held_out else "-",
            marker="o" if held_out or len(steps) == 1 else None, markersize=3, **style)
  if not twins_in_legend and any(k.startswith("val_") for k in drawn):
    title += " (dashed: held-out)"
  ax.set(xlabel="step", title=title)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, never 1.5
  ax.grid(alpha=0.3)
  if twins_in_legend:
    ax.legend(fontsize="small")
  else:  # many lines (one per reward component): beside the plot, not over it
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_curve(curve: Curve, drawn: Mapping[str, Series], path: Path, suptitle: str,
                title: str | None = None) -> Path:
  """`drawn` on one panel, or with the prefixed keys (reward components) on a second."""
  title = title or curve.title
  main = {k: s for k, s in drawn.items() if k in curve.keys or k == PENALTY_KEY}
  parts = {k: s for k, s in drawn.items() if k not in main}
  panels = [(t, group) for t, group in ((title, main), (f"{curve.title} components", parts))
            if group]
  fig = _figure(width=7.0 * len(panels) + (2.0 if len(parts) > 4 else 0.0))
  for i, (panel_title, group) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    _draw_lines(ax, group, panel_title, labels=LABELS if PENALTY_KEY in group else None)
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
  grpo = "reward" in drawn  # GRPO logs rewards; SFT never does
  return [_draw_curve(by_name[name], series_, out / f"{name}.png", str(workdir),
                      title=loss_title(series_, grpo) if name == "loss" else None)
          for name, series_ in drawn.items()]


def bar_chart_figure(results: Mapping[str, Mapping[str, float]], *,
                     metrics: Sequence[str] | None = None, title: str = "",
                     columns: int = 3) -> Figure:
  """Models vs baselines, one panel per metric in a grid of `columns` columns.

  `results` is {name: {metric: value}} (e.g. {"GRPO": {"hr@10": 0.12}, "SASRec": {...}});
  `metrics` defaults to every metric in first-seen order. Each panel has one horizontal bar per
  entry, in `results` order and color (the same in every panel), its value at the end, the
  panel's best in bold. A name without a metric gets no bar (baselines may not report every
  metric); a metric that no name reports is an error.
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
  cols = max(1, min(columns, len(metrics)))
  rows = math.ceil(len(metrics) / cols)
  panel_height = 1.0 + 0.3 * len(names)
  fig = _figure(width=1.5 + 4.0 * cols, height=0.4 + panel_height * rows)
  axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
  ys = range(len(names))
  for ax, metric in zip(axes, metrics):
    shown = [(y, float(results[n][metric])) for y, n in zip(ys, names) if metric in results[n]]
    finite = [v for _, v in shown if math.isfinite(v)]
    best = max(finite) if finite else None
    bars = ax.barh([y for y, _ in shown], [v for _, v in shown], 0.7,
                   color=[f"C{y % 10}" for y, _ in shown])
    labels = ax.bar_label(bars, labels=[f"{v:.3f}" if math.isfinite(v) else "nan"
                                        for _, v in shown], fontsize="small", padding=2)
    for label, (_, v) in zip(labels, shown):
      if v == best:
        label.set_fontweight("bold")
    ax.set_title(metric)
    ax.margins(x=0.25)  # room for the value labels right of the longest bar
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(list(ys), names)
  axes[0].invert_yaxis()  # first entry on top, as in the printed table
  for ax in axes[len(metrics):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return fig


def bar_chart(results: Mapping[str, Mapping[str, float]], path: str | Path, *,
              metrics: Sequence[str] | None = None, title: str = "", columns: int = 3) -> Path:
  """`bar_chart_figure(results, ...)` written to `path` as a PNG (100 dpi); returns `path`."""
  fig = bar_chart_figure(results, metrics=metrics, title=title, columns=columns)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)
  return path


__all__ = ["CURVES", "Curve", "LABELS", "METRICS_FILE", "PENALTY_KEY", "PG_KEY", "bar_chart",
           "bar_chart_figure", "curves", "loss_title", "penalty_series", "plot_metrics",
           "read_metrics", "series"]
