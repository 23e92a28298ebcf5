"""Collect a pipeline's results into one table: `python scripts/results_table.py --out OUT ...`.

The last step of `scripts/reproduce.sh` and `scripts/demo.sh`. Evaluation (`scripts/evaluate.py`)
and the baselines (`scripts/baselines.py`) each write their own JSON; a reader wants one file and
one table, with the published reference numbers of the dataset beside ours, so that a result is
never read without its yardstick. This script:

  * merges `--model NAME=W/eval_<split>.json` entries and `--baselines OUT/baselines_<split>.json`
    into `OUT/results.json` ({"sft": {...}, "grpo": {...}, "popularity": {...}, ...}, the flat
    metric keys of `recllm_jax.rec.metrics.evaluate_rankings`);
  * parses published rows from the dataset's README (`--data_dir`'s README.md, or its parent's
    when that one names the dataset folder): any markdown table whose first column is `model`
    and whose other columns are HR@K / NDCG@K / Recall@K. Nothing is hard-coded per dataset;
  * prints one table (`recllm_jax.rec.metrics.format_table`), ours then the published rows;
  * draws `OUT/results.png` (`recllm_jax.plots.bar_chart`, ours and the baselines);
  * with `--examples N --predictions P`, prints N example users: recent history, our top-5 and
    the true next item (titles from the dataset's catalog).

A user error (a missing or malformed file) ends with one line `error: ...` on stderr and exit
status 2, like scripts/train.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import fail  # noqa: E402  (scripts/train.py: the shared one-line user-error exit)

__all__ = ["example_lines", "find_readme", "load_results", "parse_published", "pick_examples"]

CHART_METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")
# Published columns such as "HR@10", "NDCG@10", "Recall@20" -> our flat keys "hr@10", ...
_METRIC_HEADER = re.compile(r"^(hr|ndcg|recall)@(\d+)$", re.IGNORECASE)
HISTORY_SHOWN = 5  # most recent history items printed per example user
TOP_SHOWN = 5


def find_readme(data_dir: Path) -> Path | None:
  """The README describing `data_dir`: its own README.md, else the parent's when that one names
  the folder (a collection README may describe several datasets; only trust one naming ours)."""
  own = data_dir / "README.md"
  if own.is_file():
    return own
  parent = data_dir.resolve().parent / "README.md"
  if parent.is_file() and data_dir.resolve().name in parent.read_text(encoding="utf-8"):
    return parent
  return None


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_published(text: str) -> dict[str, dict[str, float]]:
  """{model: {"hr@10": ..., ...}} from every markdown table headed `model | HR@K | NDCG@K ...`.

  Rows whose cells are not all numbers (e.g. a note) are skipped; ".0858" and "0.0858" both
  parse. Names are prefixed "published " so they cannot collide with our own entries.
  """
  rows: dict[str, dict[str, float]] = {}
  header: list[str] | None = None
  for line in text.splitlines():
    if not line.strip().startswith("|"):
      header = None
      continue
    cells = _cells(line)
    if header is None:
      keys = [_METRIC_HEADER.match(c) for c in cells[1:]]
      if cells[0].lower() == "model" and keys and all(keys):
        header = [f"{m.group(1).lower()}@{m.group(2)}" for m in keys]  # type: ignore[union-attr]
      continue
    if set("".join(cells)) <= set("-: "):  # the |---|---| separator line
      continue
    try:
      values = [float(c) for c in cells[1:1 + len(header)]]
    except ValueError:
      continue
    if len(values) == len(header):
      rows[f"published {cells[0]}"] = dict(zip(header, values))
  return rows


def _read_json(path: Path) -> dict[str, Any]:
  from recllm_jax.errors import MissingPathError, UserError

  if not path.is_file():
    raise MissingPathError(f"{path}: no such file (did the step that writes it run?)")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def load_results(models: Sequence[str], baselines: Path | None) -> dict[str, dict[str, float]]:
  """{name: metrics} for `NAME=path/eval_<split>.json` entries, then every baseline entry."""
  from recllm_jax.errors import UserError

  results: dict[str, dict[str, float]] = {}
  for spec in models:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--model {spec!r}: expected NAME=PATH/eval_<split>.json")
    results[name] = _read_json(Path(path))
  if baselines is not None:
    for name, metrics in _read_json(baselines).items():
      if not isinstance(metrics, dict):
        raise UserError(f"{baselines}: entry {name!r} is not an object of metrics")
      results[name] = metrics
  return results


def pick_examples(rows: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
  """`count` rows of distinct users, spread evenly over the file (deterministic, not cherry-picked:
  the first row of each of `count` equal slices that has a user not shown yet)."""
  chosen: list[Mapping[str, Any]] = []
  users: set[Any] = set()
  step = max(1, len(rows) // max(count, 1))
  for start in range(0, len(rows), step):
    for row in rows[start:start + step]:
      if row.get("user_id") not in users:
        chosen.append(row)
        users.add(row.get("user_id"))
        break
    if len(chosen) == count:
      break
  return chosen


def example_lines(row: Mapping[str, Any], title: Any) -> list[str]:
  """Printable lines of one prediction row; `title(item_id)` names catalog items."""
  targets = set(row["targets"])
  history = list(row["history"])[-HISTORY_SHOWN:]
  lines = [f"user {row['user_id']} (last {len(history)} of {len(row['history'])} items, oldest "
           "first):"]
  lines += [f"    {title(i)}" for i in history]
  lines.append(f"  our top-{TOP_SHOWN} (* = the true next item):")
  for rank, item in enumerate(list(row["ranked"])[:TOP_SHOWN], start=1):
    name = title(item) if item is not None else "(no valid item)"
    lines.append(f"   {'*' if item in targets else ' '}{rank}. {name}")
  lines.append("  true next item: " + "; ".join(title(i) for i in row["targets"]))
  return lines


def print_examples(predictions: Path, count: int, data_dir: Path, fmt: str) -> None:
  from recllm_jax.data import load_dataset
  from recllm_jax.errors import MissingPathError

  if not predictions.is_file():
    raise MissingPathError(f"--predictions={predictions}: no such file")
  with predictions.open(encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  catalog = load_dataset(data_dir, fmt).catalog

  def title(item: Any) -> str:
    return catalog.title(item) if item in catalog else f"(unknown item {item})"

  print(f"\n{count} example users from {predictions}:")
  for row in pick_examples(rows, count):
    print("\n".join(["", *example_lines(row, title)]))


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, help="write OUT/results.json and OUT/results.png")
  parser.add_argument("--model", action="append", default=[], metavar="NAME=EVAL_JSON",
                      help="one of our models: its scripts/evaluate.py eval_<split>.json")
  parser.add_argument("--baselines", type=Path, help="scripts/baselines.py's baselines_<split>.json")
  parser.add_argument("--data_dir", type=Path, help="the dataset (published rows, catalog titles)")
  parser.add_argument("--data_format", default="auto", help="its format (for --examples)")
  parser.add_argument("--title", default="", help="bar chart title")
  parser.add_argument("--examples", type=int, default=0, help="print N example users")
  parser.add_argument("--predictions", type=Path, help="predictions_<split>.jsonl for --examples")
  parser.error = fail  # argparse would print its usage too; keep every user error one line
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  from recllm_jax.errors import UserError
  from recllm_jax.plots import bar_chart
  from recllm_jax.rec.metrics import format_table

  try:
    if args.examples and (args.predictions is None or args.data_dir is None):
      raise UserError("--examples needs --predictions and --data_dir")
    results = load_results(args.model, args.baselines)
    if results:
      if args.out is None:
        raise UserError("--out is required with --model/--baselines")
      args.out.mkdir(parents=True, exist_ok=True)
      out_json = args.out / "results.json"
      out_json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
      readme = find_readme(args.data_dir) if args.data_dir is not None else None
      published = parse_published(readme.read_text(encoding="utf-8")) if readme else {}
      print(format_table({**results, **published}))
      if published:
        print(f"(published rows from {readme})")
      metrics = [m for m in CHART_METRICS if any(m in r for r in results.values())]
      chart = bar_chart(results, args.out / "results.png", metrics=metrics or None,
                        title=args.title)
      print(f"wrote {out_json} and {chart}")
    if args.examples:
      print_examples(args.predictions, args.examples, args.data_dir, args.data_format)
  except UserError as e:
    fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  main(sys.argv[1:])
