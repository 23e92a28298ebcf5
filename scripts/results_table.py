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
  * draws `OUT/results.png` (`recllm_jax.plots.bar_chart`: one panel per metric, ours and the
    baselines);
  * prints what the table shows (`results_reading.reading_lines`: who wins HR@10 and NDCG@10 and
    by how much over the model alone, GRPO vs its SFT, the CF-guided rows vs the CF prior alone),
    knowing each row's role from the files: a `--model` entry whose JSON has `cf_model` is
    CF-guided (its model is the plain entry of the same workdir), `--cf_prior` is the prior's
    own ranking, and a workdir whose `config.json` has `init_from` another entry's workdir was
    trained from it (GRPO from SFT);
  * with `--examples N`, prints N example users of our best row on NDCG@10 (the row is named;
    its `predictions_<split>[_tag].jsonl` sits beside its `eval_<split>[_tag].json`, or
    `--predictions P`): two in three whose true next item is in our top-5 (marked *), the rest
    misses, each with its recent history, our top-5 and the true next item (catalog titles);
  * with `--next_steps`, ends with how to recommend with that model, bring your own data and
    get the Amazon data (`results_reading.next_steps_lines`).

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
from results_reading import (MAIN_METRICS, Roles, best_of, next_steps_lines,  # noqa: E402
                             reading_lines)
from train import fail  # noqa: E402  (scripts/train.py: the shared one-line user-error exit)

__all__ = ["derive_roles", "example_lines", "find_readme", "is_hit", "load_results",
           "parse_published", "pick_examples", "predictions_for"]

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


def parse_spec(spec: str, flag: str = "--model") -> tuple[str, Path]:
  """(NAME, PATH) of a `NAME=PATH` entry."""
  from recllm_jax.errors import UserError

  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise UserError(f"{flag} {spec!r}: expected NAME=PATH/eval_<split>.json")
  return name, Path(path)


def load_results(models: Sequence[str], baselines: Path | None,
                 cf_prior: str | None = None) -> dict[str, dict[str, float]]:
  """{name: metrics} for `NAME=path/eval_<split>.json` entries, the `cf_prior` entry (same form),
  then every baseline entry."""
  from recllm_jax.errors import UserError

  results: dict[str, dict[str, float]] = {}
  specs = [parse_spec(spec) for spec in models]
  if cf_prior:
    specs.append(parse_spec(cf_prior, "--cf_prior"))
  for name, path in specs:
    results[name] = _read_json(path)
  if baselines is not None:
    for name, metrics in _read_json(baselines).items():
      if not isinstance(metrics, dict):
        raise UserError(f"{baselines}: entry {name!r} is not an object of metrics")
      results[name] = metrics
  return results


def derive_roles(results: Mapping[str, Mapping[str, Any]], models: Sequence[str],
                 cf_prior: str | None, baselines: Sequence[str]) -> Roles:
  """What each row is, from the files (see the module docstring): `models` are the `--model`
  specs, `cf_prior` the `--cf_prior` spec, `baselines` the baseline row names."""
  specs = [parse_spec(spec) for spec in models]
  plain = {name: path.parent.resolve() for name, path in specs if "cf_model" not in results[name]}
  guided = {}
  for name, path in specs:
    if "cf_model" in results[name]:
      bases = [base for base, workdir in plain.items() if workdir == path.parent.resolve()]
      if bases:
        guided[name] = bases[0]
  trained_from = {}
  for name, workdir in plain.items():
    config = workdir / "config.json"
    try:
      init_from = json.loads(config.read_text(encoding="utf-8")).get("init_from")
    except (OSError, ValueError, AttributeError):
      continue  # no run config beside the eval file (or not ours): no known start
    if isinstance(init_from, str) and init_from:
      starts = [start for start, d in plain.items()
                if start != name and d == Path(init_from).expanduser().resolve()]
      if starts:
        trained_from[name] = starts[0]
  return Roles(models=tuple(plain), trained_from=trained_from, guided=guided,
               prior=parse_spec(cf_prior, "--cf_prior")[0] if cf_prior else None,
               baselines=tuple(baselines))


def predictions_for(eval_path: Path) -> Path:
  """scripts/evaluate.py's predictions file beside an eval file: eval_<name>.json ->
  predictions_<name>.jsonl."""
  return eval_path.with_name(f"predictions_{eval_path.stem.removeprefix('eval_')}.jsonl")


def _target_rank(row: Mapping[str, Any]) -> int | None:
  """1-based rank of the first true next item in our list, or None."""
  targets = set(row["targets"])
  return next((r for r, item in enumerate(row["ranked"], start=1) if item in targets), None)


def is_hit(row: Mapping[str, Any]) -> bool:
  """A true next item is in the top TOP_SHOWN we print (so the example shows its "*")."""
  rank = _target_rank(row)
  return rank is not None and rank <= TOP_SHOWN


def _spread(rows: Sequence[Mapping[str, Any]], count: int,
            users: set[Any]) -> list[Mapping[str, Any]]:
  """`count` rows of users not in `users` (which grows), spread evenly over `rows`: the first
  such row of each of `count` equal slices (deterministic, not cherry-picked)."""
  chosen: list[Mapping[str, Any]] = []
  if count <= 0:
    return chosen
  step = max(1, len(rows) // count)
  for start in range(0, len(rows), step):
    for row in rows[start:start + step]:
      if row.get("user_id") not in users:
        chosen.append(row)
        users.add(row.get("user_id"))
        break
    if len(chosen) == count:
      break
  return chosen


def pick_examples(rows: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
  """`count` rows of distinct users that show hits and misses: hits (`is_hit`) first, two in
  three of them (at least one miss when count >= 2), topped up from the other kind when one
  runs short; within each kind spread evenly over the file."""
  hits = [r for r in rows if is_hit(r)]
  misses = [r for r in rows if not is_hit(r)]
  want_misses = max(1, count // 3) if count >= 2 else 0
  users: set[Any] = set()
  chosen = _spread(hits, count - min(want_misses, len(misses)), users)
  chosen += _spread(misses, count - len(chosen), users)
  chosen += _spread(hits, count - len(chosen), users)  # misses ran short
  return chosen


def _outcome(row: Mapping[str, Any]) -> str:
  rank = _target_rank(row)
  if rank is None:
    return f"miss: not in our top-{len(row['ranked'])}"
  return f"hit: our #{rank}" if rank <= TOP_SHOWN else f"miss: our #{rank}"


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
  lines.append("  true next item: " + "; ".join(title(i) for i in row["targets"])
               + f"  ({_outcome(row)})")
  return lines


def read_predictions(predictions: Path) -> list[dict[str, Any]]:
  from recllm_jax.errors import MissingPathError

  if not predictions.is_file():
    raise MissingPathError(f"--predictions={predictions}: no such file")
  with predictions.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def print_examples(predictions: Path, rows: Sequence[Mapping[str, Any]], count: int,
                   data_dir: Path, fmt: str, source: str) -> list[Mapping[str, Any]]:
  """Prints `count` example users of `rows` (`pick_examples`), read from `predictions`, under
  a header naming `source` (the row they come from); returns them."""
  from recllm_jax.data import load_dataset

  catalog = load_dataset(data_dir, fmt).catalog

  def title(item: Any) -> str:
    return catalog.title(item) if item in catalog else f"(unknown item {item})"

  chosen = pick_examples(rows, count)
  hits = sum(is_hit(r) for r in chosen)
  print(f"\n{len(chosen)} example users of {source} ({predictions}):\n{hits} with the true next "
        f"item in our top-{TOP_SHOWN} (marked *), {len(chosen) - hits} without.")
  for row in chosen:
    print("\n".join(["", *example_lines(row, title)]))
  return chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, help="write OUT/results.json and OUT/results.png")
  parser.add_argument("--model", action="append", default=[], metavar="NAME=EVAL_JSON",
                      help="one of our models: its scripts/evaluate.py eval_<split>.json")
  parser.add_argument("--cf_prior", metavar="NAME=EVAL_JSON",
                      help="the CF prior's own ranking: evaluate.py's eval_<split>_cf_<model>.json")
  parser.add_argument("--baselines", type=Path, help="scripts/baselines.py's baselines_<split>.json")
  parser.add_argument("--data_dir", type=Path, help="the dataset (published rows, catalog titles)")
  parser.add_argument("--data_format", default="auto", help="its format (for --examples)")
  parser.add_argument("--title", default="", help="bar chart title")
  parser.add_argument("--examples", type=int, default=0, help="print N example users")
  parser.add_argument("--predictions", type=Path,
                      help="predictions_<split>.jsonl for --examples (default: our best row's)")
  parser.add_argument("--next_steps", action="store_true",
                      help="end with how to use the best model, your own data, the Amazon data")
  parser.error = fail  # argparse would print its usage too; keep every user error one line
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  from recllm_jax.errors import UserError
  from recllm_jax.plots import bar_chart
  from recllm_jax.rec.metrics import format_table

  try:
    if args.examples and args.data_dir is None:
      raise UserError("--examples needs --data_dir")
    results = load_results(args.model, args.baselines, args.cf_prior)
    paths = dict(parse_spec(m) for m in args.model)
    prior = parse_spec(args.cf_prior, "--cf_prior")[0] if args.cf_prior else None
    roles = derive_roles(results, args.model, args.cf_prior,
                         [n for n in results if n not in paths and n != prior])
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
      reading = reading_lines({**results, **published}, roles)
      if reading:
        print("\n" + "\n".join(reading))

    # Our best row with predictions of its own: the examples and the next steps use it.
    with_predictions = [n for n in roles.ours() if predictions_for(paths[n]).is_file()]
    best = best_of(results, with_predictions, MAIN_METRICS[-1])
    if args.predictions is not None:
      predictions, source = args.predictions, args.predictions.name
    elif best is not None:
      predictions = predictions_for(paths[best])
      source = f"{best}, our best row on {MAIN_METRICS[-1]}"
    else:
      predictions, source = None, ""
    wanted = predictions is not None and (args.examples or args.next_steps)
    rows = read_predictions(predictions) if wanted else []
    chosen = rows[:1]
    if args.examples:
      if predictions is None:
        raise UserError("--examples needs --predictions or a --model whose predictions_*.jsonl "
                        "sits beside its eval_*.json")
      chosen = print_examples(predictions, rows, args.examples, args.data_dir,
                              args.data_format, source) or chosen
    if args.next_steps and best is not None:
      print("\n" + "\n".join(next_steps_lines(
          workdir=paths[best].parent, history=chosen[0]["history"] if chosen else (),
          cf=results[best] if best in roles.guided else None)))
  except UserError as e:
    fail(e)


if __name__ == "__main__":
  main(sys.argv[1:])
