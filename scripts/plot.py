"""Plot a run's training curves: `python scripts/plot.py --workdir W [--out DIR]`.

Reads `W/metrics.jsonl` and writes one PNG per curve the run logged (loss, reward and its
components, KL, completion length; see `recllm_jax.plots.CURVES`) into W (or `--out`), printing
each path. Safe to run while training is still going: it plots the rows written so far.

A user error (no metrics.jsonl, a malformed line, nothing plottable) ends with one line
`error: ...` on stderr and exit status 2, like scripts/train.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import fail  # noqa: E402  (scripts/train.py: the shared one-line user-error exit)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, type=Path, help="a run's workdir")
  parser.add_argument("--out", type=Path, default=None,
                      help="directory for the PNG files (default: the workdir)")
  parser.error = fail  # argparse would print its usage too; keep every user error one line
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  from recllm_jax.errors import UserError
  from recllm_jax.plots import plot_metrics

  try:
    paths = plot_metrics(args.workdir, args.out)
  except UserError as e:
    fail(e)
  for path in paths:
    print(path)


if __name__ == "__main__":
  main(sys.argv[1:])
