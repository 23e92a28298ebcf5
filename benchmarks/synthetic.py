"""Time to generate and read the default synthetic dataset (the offline default of every run).

    python benchmarks/synthetic.py [--repeats 5] [--num-users 400]

Prints the best and median wall time of `generate_synthetic` into a fresh directory, of
`read_jsonl` on the result, and of a cached `load_dataset(..., "synthetic")` call (fingerprint
check + read). Nothing is asserted: timings depend on the machine; the tests check correctness.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from recllm_jax.data import generate_synthetic, load_dataset, read_jsonl


def timed(fn, repeats: int) -> list[float]:
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - start)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num-users", type=int, default=400)
  parser.add_argument("--num-items", type=int, default=500)
  args = parser.parse_args()
  settings = dict(num_users=args.num_users, num_items=args.num_items)
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    results = {
      "generate_synthetic": timed(lambda i: generate_synthetic(root / f"g{i}", **settings), args.repeats),
      "read_jsonl": timed(lambda i: read_jsonl(root / "g0"), args.repeats),
    }
    if args.num_users == 400 and args.num_items == 500:  # load_dataset uses the defaults
      load_dataset(root / "cached", "synthetic")
      results["load_dataset (cached)"] = timed(lambda i: load_dataset(root / "cached", "synthetic"),
                                               args.repeats)
  print(f"{args.num_users} users, {args.num_items} items, {args.repeats} repeats")
  for name, times in results.items():
    print(f"  {name:24s} best {min(times) * 1e3:8.1f} ms   median {statistics.median(times) * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
