"""Baselines in the evaluation harness: `python scripts/baselines.py --config.data.dir=D --split test`.

Fits the popularity, item-to-item transition (Markov) and SASRec baselines on the dataset's
training split, scores them on `--split` with `recllm_jax.rec.metrics.evaluate_rankings` (the
harness the LLM is scored with), prints a table and writes `<workdir>/baselines_<split>.json` as
`{"popularity": {"hr@10": ...}, "markov": {...}, "sasrec": {...}}`. The config defaults to
`configs/baselines.py`; override keys with `--config.key=value` (see that file).

It also saves the fitted CF models (popularity, Markov transition counts and, when run, the
SASRec parameters) as `<workdir>/cf_models.json` + `cf_models.npz`
(`recllm_jax.rec.cf_prior.save_cf_models`): `scripts/evaluate.py --cf_from <workdir>` builds its
CF prior from them instead of fitting SASRec again (minutes on Office), and refuses them when
they were fitted on other data or with another SASRec config.

A user error (a bad flag or config value, a missing path, bad data) ends with one line
`error: ...` on stderr and exit status 2, like scripts/train.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# scripts/train.py defines the `--config` flag; reuse its one-line flag errors and user-error exit.
from train import fail, load_config, parse_flags, start_script  # noqa: E402

from absl import app, flags  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "baselines.py"
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Split to evaluate on.")


def parse_baseline_flags(argv: list[str]) -> list[str]:
  """`parse_flags` with `--config` defaulting to configs/baselines.py."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  return parse_flags(argv)


def main(argv: list[str]) -> None:
  start_script(argv)
  # Imported after flag parsing so that --help stays fast.
  from recllm_jax.errors import ConfigError, UserError
  from recllm_jax.rec.baselines import SASRecConfig, parse_baselines, run_baselines
  from recllm_jax.rec.cf_prior import fit_cf_models, save_cf_models
  from recllm_jax.rec.metrics import format_table
  from recllm_jax.train.checks import expand_paths
  from recllm_jax.data.loading import load_run_data

  config = load_config()
  split = _SPLIT.value
  start = time.perf_counter()
  try:
    config = expand_paths(config)
    workdir = Path(config.workdir)
    names = parse_baselines(config.baselines)
    sasrec = SASRecConfig(**config.sasrec.to_dict(), seed=config.seed)
    if config.markov.backoff < 1:
      raise ConfigError(f"markov.backoff must be >= 1, got {config.markov.backoff}")
    if not config.ks or min(config.ks) < 1:
      raise ConfigError(f"ks must be positive cut-offs, got {config.ks}")
    dataset, _ = load_run_data(config, workdir)
    fitted: dict = {}
    results = run_baselines(dataset, split, names, ks=config.ks, sasrec=sasrec,
                            markov_backoff=config.markov.backoff,
                            exclude_history=config.popularity.exclude_history, progress=True,
                            fitted=fitted)
  except UserError as e:
    fail(e)
  workdir.mkdir(parents=True, exist_ok=True)
  out = workdir / f"baselines_{split}.json"
  out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  # The CF priors' models, for scripts/evaluate.py --cf_from (Markov counts are recounted here:
  # well under a second, and the prior's counts, not the baseline's ranking, are what it needs).
  models = fit_cf_models(dataset, sasrec=sasrec if "sasrec" in fitted else None,
                         sasrec_model=fitted.get("sasrec"))
  saved = save_cf_models(models, workdir)
  count = int(next(iter(results.values()))["num_examples"])
  print(f"\n{split}: {count} examples, {len(dataset.catalog)} catalog items, full-catalog ranking")
  print(format_table(results))
  print(f"wrote {out}, {saved} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_baseline_flags)
