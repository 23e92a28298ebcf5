"""Build semantic IDs for a dataset's catalog: `python scripts/build_sids.py --data_dir DIR
[--format auto] [--out DIR/sids.tsv] [--features text+cooc] [--levels 3] [--codebook_size 256]
[--dim 64] [--seed 0] [--valid_fraction 0.1] [--valid_holdout last_row]
[--compare info.txt|sids.tsv|DIR]`.

Embeds every catalog item (item text and/or co-occurrence in the *training* split, each
example's `history + targets`), quantises the embeddings with balanced residual k-means and
writes `item_id<TAB>sid` lines to `--out` (see `recllm_jax.data.sids` and docs/data.md,
"Semantic IDs"). The build is deterministic for `--seed`. For amazon18 data the training split
is the one `data.valid_fraction` / `data.valid_holdout` give a run: build with the run's values,
so that co-occurrence never sees the rows that run holds out (e.g. a study on held-out users).

`--compare` reads reference SIDs (an Amazon `info.txt`: `<sid>\\t<title>\\t<item_id>`, or a
`sids.tsv`; a directory means its `info.txt`, else its `sids.tsv`) and prints how the built
SIDs relate to them, so a builder change can be checked against published SIDs:

* items, collisions before resolution (items that needed an extra level), depth histogram and
  the number of distinct codes used per level;
* NMI and ARI between the level-0 codes of both (the coarse clustering; 1 = identical
  partitions, 0 = independent), over the items both cover;
* neighbour agreement: for each item, its nearest neighbours under the built SIDs are the other
  items sharing its longest built prefix; the score is the share of those neighbours that also
  share the longest prefix the item shares with anyone under the reference SIDs, averaged over
  items (ties count fractionally, so no arbitrary tie-break). "chance" is the same score for
  neighbours drawn uniformly from all other items.

Errors (a missing directory, a bad flag, a malformed file) print one line `error: ...` to
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from recllm_jax.data.amazon18 import VALID_HOLDOUTS
from recllm_jax.data.errors import DataError
from recllm_jax.data.loading import FORMATS, load_dataset
from recllm_jax.data.sids import FEATURES, SID_FILE, build_sids, parse_sid, read_sid_file, write_sid_file
from recllm_jax.errors import UserError

INFO_FILE = "info.txt"
MAX_LEVELS = 25  # 26 level letters a..z, one kept for collision resolution


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # one line, no usage block: scripts and CI grep it
    fail(message)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _int_in(low: int, high: int | None = None):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
      bound = f">= {low}" if high is None else f"in [{low}, {high}]"
      raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value

  return parse


def _fraction(text: str) -> float:
  """A float in [0, 1), as `data.valid_fraction`."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
  return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = _Parser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True, help="dataset directory")
  p.add_argument("--format", default="auto", choices=FORMATS, help="dataset format (default: auto)")
  p.add_argument("--out", default=None, help=f"output file (default: <data_dir>/{SID_FILE})")
  p.add_argument("--features", default="text+cooc", choices=FEATURES, help="item embedding (default: text+cooc)")
  p.add_argument("--levels", type=_int_in(1, MAX_LEVELS), default=3, help="SID levels before collisions (default: 3)")
  p.add_argument("--codebook_size", type=_int_in(1), default=256, help="codes per level (default: 256)")
  p.add_argument("--dim", type=_int_in(1), default=64, help="embedding dimension per feature (default: 64)")
  p.add_argument("--seed", type=_int_in(0), default=0, help="seed of SVD start vectors and k-means++ (default: 0)")
  p.add_argument("--valid_fraction", type=_fraction, default=0.1,
                 help="amazon18: the run's data.valid_fraction (default: 0.1)")
  p.add_argument("--valid_holdout", default="last_row", choices=VALID_HOLDOUTS,
                 help="amazon18: the run's data.valid_holdout (default: last_row)")
  p.add_argument("--compare", default=None, metavar="FILE_OR_DIR",
                 help=f"reference SIDs to compare with: {INFO_FILE}, {SID_FILE}, or a directory holding one")
  return p.parse_args(argv)


# --------------------------------------------------------------------------- reference SIDs


def read_info_file(path: Path) -> dict[str, str]:
  """item_id -> SID from an Amazon `info.txt` (`<sid>\\t<title>\\t<item_id>`; titles may hold tabs)."""
  out: dict[str, str] = {}
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 3:
      raise DataError(f"expected '<sid>\\t<title>\\t<item_id>', got {len(fields)} fields", path=path, line=number)
    sid, item_id = fields[0].strip(), fields[-1].strip()
    try:
      parse_sid(sid)
    except ValueError as e:
      raise DataError(str(e), path=path, line=number) from e
    if item_id in out:
      raise DataError(f"duplicate item id {item_id!r}", path=path, line=number)
    out[item_id] = sid
  return out


def read_reference(path: Path) -> dict[str, str]:
  """Reference SIDs from an `info.txt`, a `sids.tsv`, or a directory holding one of them."""
  if path.is_dir():
    for name in (INFO_FILE, SID_FILE):
      if (path / name).is_file():
        return read_reference(path / name)
    raise DataError(f"no {INFO_FILE} or {SID_FILE} in this directory", path=path)
  if not path.is_file():
    raise DataError("comparison file not found", path=path)
  first = next((line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")), "")
  return read_info_file(path) if first.count("\t") >= 2 else read_sid_file(path)


# --------------------------------------------------------------------------- metrics


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  _, ai = np.unique(a, return_inverse=True)
  _, bi = np.unique(b, return_inverse=True)
  table = np.zeros((ai.max() + 1, bi.max() + 1))
  np.add.at(table, (ai, bi), 1)
  return table


def nmi(a: np.ndarray, b: np.ndarray) -> float:
  """Normalised mutual information, arithmetic-mean normalisation (sklearn's default)."""
  table = _contingency(a, b) / len(a)
  pa, pb = table.sum(1), table.sum(0)
  nz = table > 0
  mi = float((table[nz] * np.log(table[nz] / np.outer(pa, pb)[nz])).sum())
  ha, hb = float(-(pa * np.log(pa)).sum()), float(-(pb * np.log(pb)).sum())
  if ha + hb == 0:
    return 1.0
  return max(0.0, mi / ((ha + hb) / 2))


def ari(a: np.ndarray, b: np.ndarray) -> float:
  """Adjusted Rand index (Hubert & Arabie)."""
  table = _contingency(a, b)

  def pairs(x: np.ndarray) -> float:
    return float((x * (x - 1) / 2).sum())

  index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
  total = len(a) * (len(a) - 1) / 2
  expected = rows * cols / total if total else 0.0
  maximum = (rows + cols) / 2
  return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def _prefixes(codes: tuple[int, ...]) -> list[tuple[int, ...]]:
  return [codes[:d] for d in range(len(codes) + 1)]


def _deepest_shared(codes: tuple[int, ...], counts: Mapping[tuple[int, ...], int]) -> tuple[int, ...]:
  """The longest prefix of `codes` that another item also has (`()` if none)."""
  return max((p for p in _prefixes(codes) if counts[p] >= 2), key=len)


def neighbour_agreement(built: Mapping[str, tuple[int, ...]], ref: Mapping[str, tuple[int, ...]]) -> tuple[float, float]:
  """(agreement, chance) as described in the module docstring; keys are the compared items."""
  items = list(built)
  if len(items) < 2:
    return float("nan"), float("nan")
  built_count = collections.Counter(p for i in items for p in _prefixes(built[i]))
  ref_count = collections.Counter(p for i in items for p in _prefixes(ref[i]))
  # Items sharing built prefix b AND reference prefix r, for every pair of prefixes of an item:
  # O(N * depth^2) instead of comparing all pairs.
  joint = collections.Counter((b, r) for i in items for b in _prefixes(built[i]) for r in _prefixes(ref[i]))
  score = chance = 0.0
  for i in items:
    b = _deepest_shared(built[i], built_count)
    r = _deepest_shared(ref[i], ref_count)
    score += (joint[(b, r)] - 1) / (built_count[b] - 1)
    chance += (ref_count[r] - 1) / (len(items) - 1)
  return score / len(items), chance / len(items)


def _groups(counts: collections.Counter) -> str:
  shared = [n for n in counts.values() if n > 1]
  return f"{sum(shared)} items in {len(shared)} groups (largest {max(shared, default=0)})"


def describe(sids: Mapping[str, str], levels: int | None = None) -> None:
  """Print counts, collisions, depth histogram and codes used per level.

  With `levels` (the built SIDs), items deeper than `levels` are the ones
  :func:`resolve_collisions` extended, so their first `levels` codes are the
  collisions before resolution; without (reference SIDs) shared SIDs are.
  """
  codes = [parse_sid(s) for s in sids.values()]
  depth = collections.Counter(len(c) for c in codes)
  print(f"  items: {len(codes)}, distinct SIDs: {len(set(codes))}")
  if levels is not None:
    extended = collections.Counter(c[:levels] for c in codes if len(c) > levels)
    print(f"  collisions before resolution: {_groups(extended)}")
  else:
    print(f"  items sharing a SID: {_groups(collections.Counter(codes))}")
  print("  depth histogram: " + ", ".join(f"{d}: {n}" for d, n in sorted(depth.items())))
  used = [len({c[level] for c in codes if len(c) > level}) for level in range(max(depth))]
  print("  codes used per level: " + ", ".join(f"{chr(ord('a') + lv)}: {n}" for lv, n in enumerate(used)))


def compare(built: Mapping[str, str], ref: Mapping[str, str], ref_path: Path) -> None:
  common = [i for i in built if i in ref]
  print(f"comparison with {ref_path}: {len(common)} items in both "
        f"({len(built) - len(common)} only built, {len(ref) - len(common)} only reference)")
  if not common:
    return
  print("reference SIDs:")
  describe({i: ref[i] for i in common})
  b = {i: parse_sid(built[i]) for i in common}
  r = {i: parse_sid(ref[i]) for i in common}
  a0, r0 = np.array([b[i][0] for i in common]), np.array([r[i][0] for i in common])
  print(f"  level-0 agreement: NMI {nmi(a0, r0):.4f}, ARI {ari(a0, r0):.4f}")
  agree, chance = neighbour_agreement(b, r)
  print(f"  neighbour agreement: {agree:.4f} (chance {chance:.4f})")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()

  def progress(message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

  logging.basicConfig(level=logging.INFO, format="          %(message)s", stream=sys.stdout)
  data_dir = Path(args.data_dir)
  if not data_dir.is_dir():
    fail(f"--data_dir {data_dir} is not a directory")
  out = Path(args.out) if args.out else data_dir / SID_FILE
  if not out.parent.is_dir():
    fail(f"--out: directory {out.parent} does not exist")
  try:
    ref = None
    if args.compare:
      ref = read_reference(Path(args.compare))
      progress(f"read {len(ref)} reference SIDs from {args.compare}")
    ds = load_dataset(data_dir, args.format, valid_fraction=args.valid_fraction,
                      valid_holdout=args.valid_holdout)
    sequences = [ex.history + ex.targets for ex in ds.train]
    progress(f"loaded {ds!r}; {len(sequences)} training sequences")
    sids = build_sids(ds.catalog, sequences, features=args.features, num_levels=args.levels,
                      codebook_size=args.codebook_size, dim=args.dim, seed=args.seed)
    progress(f"built {len(sids)} SIDs")
    header = (f"semantic IDs built by scripts/build_sids.py from {data_dir} ({args.format}): "
              f"features={args.features} levels={args.levels} codebook_size={args.codebook_size} "
              f"dim={args.dim} seed={args.seed} valid_fraction={args.valid_fraction} "
              f"valid_holdout={args.valid_holdout}; items sharing a SID got one extra level")
    write_sid_file(out, sids, header=header)
    progress(f"wrote {out}")
    print("built SIDs:")
    describe(sids, args.levels)
    if ref is not None:
      compare(sids, ref, Path(args.compare))
    progress("done")
  except (UserError, OSError) as e:
    fail(f"{type(e).__name__}: {e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
