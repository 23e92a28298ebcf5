"""Choose settings on valid rows, report them on test, over seeds: `python scripts/study.py`.

    python scripts/study.py --out workdirs/study_valid --split valid \\
        --set data.dir=../shared/data/amazon18/Office_Products \\
        --set data.valid_holdout=users --set data.valid_fraction=0.25 \\
        --sft_arm "base" --sft_arm "drop02 model.dropout=0.2" \\
        --grpo_arm "office" --grpo_arm "sync10 grpo.ref_sync_every=10" --seeds 0,1,2

Every SFT arm is trained once per seed (`scripts/train.py --config.seed=S`) and evaluated on
`--split` (`scripts/evaluate.py`, plain constrained beam: the model alone); every GRPO arm then
continues each of those SFT runs (`--config.init_from=<its SFT workdir>`) and is evaluated the
same way. An arm is a name followed by `key=value` overrides of its stage's config (and
optionally `config=FILE[:preset]`, that arm's own config file instead of `--sft_config` /
`--grpo_config`, e.g. `"mo config=configs/grpo.py:minionerec"`); `--set`
overrides reach every run (train and eval, both stages). Up to `--parallel` runs go at once:
more than one only pays on an accelerator or a many-core host (on GPUs each process then
allocates on demand instead of taking 75% of the memory).

Outputs, in `--out`:
  <sft_arm>/seed<S>/sft, <sft_arm>/seed<S>/grpo_<grpo_arm>   each run's workdir and logs
  baselines/                      `--baselines`: popularity, Markov, SASRec on the same rows
  study.json                      every run's metrics, wall time and reward curve ends
  study.md                        per arm: every seed's value, the mean and its standard error;
                                  GRPO arms also their ratio to their own seed's SFT run

A run whose evaluation file exists is not run again, so an interrupted study resumes where it
stopped; a failed run is reported with its log and the others go on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Keys scripts/baselines.py's config shares with the training configs.
BASELINE_KEYS = ("seed", "data.dir", "data.format", "data.on_bad_data", "data.valid_fraction",
                 "data.valid_holdout")


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  overrides: tuple[str, ...]  # "key=value"
  config: str | None = None  # `config=FILE[:preset]` in the arm: its own config, not --*_config


@dataclasses.dataclass
class Run:
  stage: str  # "sft" or "grpo"
  sft_arm: str
  grpo_arm: str | None
  seed: int
  workdir: Path
  config: str
  overrides: list[str]  # "--config.key=value"
  init_from: Path | None = None
  metrics: dict | None = None
  seconds: float = 0.0
  error: str | None = None


def parse_arm(text: str) -> Arm:
  """'name key=value ...' -> Arm; the name becomes a folder name, so it is kept simple."""
  words = shlex.split(text)
  if not words:
    raise ValueError("an arm needs a name: 'name [key=value ...]'")
  name, *overrides = words
  if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
    raise ValueError(f"arm name {name!r}: use letters, digits, '_', '-', '.'")
  for o in overrides:
    if "=" not in o or o.startswith("-"):
      raise ValueError(f"arm {name!r}: override {o!r} is not key=value (without --config.)")
  config = [o.split("=", 1)[1] for o in overrides if o.startswith("config=")]
  return Arm(name, tuple(o for o in overrides if not o.startswith("config=")),
             config[-1] if config else None)


def config_flags(overrides) -> list[str]:
  return [f"--config.{o}" for o in overrides]


def plan_runs(args: argparse.Namespace) -> tuple[list[Run], dict[int, list[Run]]]:
  """The SFT runs, and for each (by index) the GRPO runs that continue it."""
  sft_runs, followers = [], {}
  common = config_flags(args.set)
  for arm in args.sft_arm:
    for seed in args.seeds:
      root = args.out / arm.name / f"seed{seed}"
      sft = Run("sft", arm.name, None, seed, root / "sft", arm.config or args.sft_config,
                [*common, *config_flags(arm.overrides), f"--config.seed={seed}",
                 f"--config.workdir={root / 'sft'}"])
      followers[len(sft_runs)] = [
          Run("grpo", arm.name, g.name, seed, root / f"grpo_{g.name}", g.config or args.grpo_config,
              [*common, *config_flags(g.overrides), f"--config.seed={seed}",
               f"--config.init_from={root / 'sft'}", f"--config.workdir={root / f'grpo_{g.name}'}"],
              init_from=root / "sft")
          for g in args.grpo_arm]
      sft_runs.append(sft)
  return sft_runs, followers


def _call(cmd: list[str], log: Path, env: dict, deadline: float = math.inf) -> None:
  """Runs `cmd` into `log`; a run still going at `deadline` (time.monotonic) is killed."""
  with log.open("a", encoding="utf-8") as f:
    f.write(f"\n$ {shlex.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
      proc.wait(timeout=None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      raise RuntimeError(f"killed at the study's --timeout (log: {log})") from None
  if proc.returncode:
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    raise RuntimeError(f"exit {proc.returncode}: {tail[0] if tail else ''} (log: {log})")


def reward_curve(workdir: Path) -> dict:
  """First and last logged mean reward of a GRPO run (metrics.jsonl), for the study table."""
  from recllm_jax.plots import METRICS_FILE, read_metrics

  path = workdir / METRICS_FILE
  if not path.exists():
    return {}
  rewards = [r["reward"] for r in read_metrics(path) if "reward" in r]
  return {"reward_first": rewards[0], "reward_last": rewards[-1]} if rewards else {}


def execute(run: Run, args: argparse.Namespace, env: dict) -> Run:
  out = run.workdir / f"eval_{args.split}.json"
  if not out.exists() and time.monotonic() >= args.deadline:
    run.error = "not run: the study's --timeout had passed"
    return run
  if not out.exists():
    run.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
      _call([sys.executable, "scripts/train.py", "--config", run.config, *run.overrides],
            run.workdir / "study_train.log", env, args.deadline)
      _call([sys.executable, "scripts/evaluate.py", "--config", run.config, *run.overrides,
             "--split", args.split, "--k", str(args.k), *shlex.split(args.eval_flags)],
            run.workdir / "study_eval.log", env, args.deadline)
    except RuntimeError as e:
      run.error = str(e)
      return run
    (run.workdir / "study_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
  run.metrics = json.loads(out.read_text())
  seconds = run.workdir / "study_seconds.txt"
  run.seconds = float(seconds.read_text()) if seconds.exists() else 0.0
  if run.stage == "grpo":
    run.metrics.update(reward_curve(run.workdir))
  return run


def run_baselines(args: argparse.Namespace, env: dict) -> dict:
  out = args.out / "baselines" / f"baselines_{args.split}.json"
  if not out.exists():
    shared = [o for o in args.set if o.split("=", 1)[0] in BASELINE_KEYS]
    (args.out / "baselines").mkdir(parents=True, exist_ok=True)
    _call([sys.executable, "scripts/baselines.py", *config_flags(shared),
           f"--config.workdir={args.out / 'baselines'}", "--split", args.split],
          args.out / "baselines" / "study.log", env, args.deadline)
  return json.loads(out.read_text())


def mean_se(values: list[float]) -> tuple[float, float]:
  mean = statistics.fmean(values)
  se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
  return mean, se


def summarize(runs: list[Run], baselines: dict, metrics: list[str]) -> str:
  """The markdown table: one row per arm, every seed's values, mean +- standard error."""
  sft = {(r.sft_arm, r.seed): r for r in runs if r.stage == "sft" and r.metrics}
  arms: dict[tuple, list[Run]] = {}
  for r in runs:
    if r.metrics:
      arms.setdefault((r.sft_arm, r.grpo_arm), []).append(r)
  head = ["arm", "seeds", *[f"{m} (per seed)" for m in metrics], *[f"{m} mean +- se" for m in metrics],
          f"{metrics[-1]} / own SFT (per seed; mean, min)", "GRPO reward first -> last", "minutes/run"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (sft_arm, grpo_arm), rs in arms.items():
    rs = sorted(rs, key=lambda r: r.seed)
    cells = [sft_arm if grpo_arm is None else f"{sft_arm} -> grpo {grpo_arm}",
             ",".join(str(r.seed) for r in rs)]
    cells += [" ".join(f"{r.metrics[m]:.4f}" for r in rs) for m in metrics]
    cells += ["{:.4f} +- {:.4f}".format(*mean_se([r.metrics[m] for r in rs])) for m in metrics]
    ratios = [r.metrics[metrics[-1]] / sft[(sft_arm, r.seed)].metrics[metrics[-1]]
              for r in rs if grpo_arm and (sft_arm, r.seed) in sft
              and sft[(sft_arm, r.seed)].metrics[metrics[-1]] > 0]
    cells.append(f"{' '.join(f'{x:.3f}' for x in ratios)}; {statistics.fmean(ratios):.3f}, "
                 f"{min(ratios):.3f}" if ratios else "")
    curves = [r.metrics for r in rs if "reward_first" in r.metrics]
    cells.append(" ".join(f"{c['reward_first']:.3f}->{c['reward_last']:.3f}" for c in curves))
    cells.append(f"{statistics.fmean(r.seconds for r in rs) / 60:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  for name, values in baselines.items():
    cells = [f"*{name}*", "", *["" for _ in metrics],
             *[f"{values[m]:.4f}" if m in values else "" for m in metrics], "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  p.add_argument("--out", type=Path, required=True, help="the study's folder")
  p.add_argument("--sft_config", default="configs/sft.py:office")
  p.add_argument("--grpo_config", default="configs/grpo.py:office")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for every run (repeatable)")
  p.add_argument("--sft_arm", action="append", type=parse_arm, default=[],
                 metavar="'NAME [KEY=VALUE ...]'", help="an SFT arm (repeatable; default: "
                 "one arm 'base' without overrides)")
  p.add_argument("--grpo_arm", action="append", type=parse_arm, default=[],
                 metavar="'NAME [KEY=VALUE ...]'", help="a GRPO arm run from every SFT run "
                 "(repeatable; none: SFT only)")
  p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
  p.add_argument("--split", default="valid", choices=["valid", "test"],
                 help="choose on valid; report the chosen arms on test")
  p.add_argument("--k", type=int, default=20, help="list length (beams)")
  p.add_argument("--metrics", default="hr@10,ndcg@10", help="columns of study.md; the last "
                 "one gives the GRPO / SFT ratio")
  p.add_argument("--eval_flags", default="", help="extra scripts/evaluate.py flags, e.g. "
                 "'--batch_size 256'")
  p.add_argument("--parallel", type=int, default=1, help="runs at once")
  p.add_argument("--timeout", type=float, default=0, help="seconds; runs still going then are "
                 "killed, later ones skipped, and the table holds what finished (0 = none)")
  p.add_argument("--baselines", action="store_true", help="also run scripts/baselines.py on "
                 "the same rows")
  args = p.parse_args(argv)
  for o in args.set:
    if "=" not in o:
      p.error(f"--set {o!r} is not key=value")
  args.sft_arm = args.sft_arm or [Arm("base", ())]
  args.metrics = args.metrics.split(",")
  args.deadline = time.monotonic() + args.timeout if args.timeout > 0 else math.inf
  for kind in ("sft_arm", "grpo_arm"):
    names = [a.name for a in getattr(args, kind)]
    if len(set(names)) != len(names):
      p.error(f"--{kind} names repeat: {names}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if args.parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sft_runs, followers = plan_runs(args)
  done: list[Run] = []
  lock = threading.Lock()
  total = len(sft_runs) + sum(map(len, followers.values()))
  start = time.perf_counter()

  def report(run: Run) -> None:
    with lock:
      done.append(run)
      what = f"{run.sft_arm}/seed{run.seed}/{run.workdir.name}"
      result = (f"FAILED {run.error}" if run.error else
                " ".join(f"{m} {run.metrics[m]:.4f}" for m in args.metrics))
      print(f"[{len(done)}/{total} {time.perf_counter() - start:.0f}s] {what}: {result}",
            flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    baselines = pool.submit(run_baselines, args, env) if args.baselines else None

    def sft_then_grpo(index: int, run: Run) -> list[concurrent.futures.Future]:
      report(execute(run, args, env))
      later = []
      for g in followers[index]:
        if run.error:
          g.error = f"not run: its SFT run failed ({run.error})"
          report(g)
        else:
          later.append(pool.submit(lambda g=g: report(execute(g, args, env))))
      return later

    sft_futures = [pool.submit(sft_then_grpo, i, run) for i, run in enumerate(sft_runs)]
    for f in [g for f in sft_futures for g in f.result()]:
      f.result()
    baseline_metrics = {}
    if baselines is not None:
      try:
        baseline_metrics = baselines.result()
      except RuntimeError as e:
        print(f"baselines FAILED {e}", flush=True)
  runs = sorted(done, key=lambda r: (r.sft_arm, r.grpo_arm or "", r.seed))
  table = summarize(runs, baseline_metrics, args.metrics)
  (args.out / "study.md").write_text(table, encoding="utf-8")
  (args.out / "study.json").write_text(json.dumps({
      "split": args.split, "k": args.k, "set": args.set,
      "runs": [{"stage": r.stage, "sft_arm": r.sft_arm, "grpo_arm": r.grpo_arm, "seed": r.seed,
                "workdir": str(r.workdir), "overrides": r.overrides, "seconds": r.seconds,
                "error": r.error, "metrics": r.metrics} for r in runs],
      "baselines": baseline_metrics}, indent=2) + "\n", encoding="utf-8")
  print(table + f"wrote {args.out / 'study.md'}, {args.out / 'study.json'}")
  return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
  sys.exit(main())
