"""What a results table says, in a few lines computed from its numbers, and what to do next.

Used by `scripts/results_table.py` (the last step of `scripts/reproduce.sh` and `scripts/demo.sh`):

  * `reading_lines(results, roles)`: which row wins each main metric (HR@10, NDCG@10) and by how
    much over the model alone, whether each fine-tuned model (GRPO) beat the one it started from
    (SFT), whether the CF-guided rows add anything over the CF prior alone, and a one-line
    summary of what that means. A gap is called noise when it is under about two standard
    errors: for per-user scores in [0, 1] with mean v over n users the standard error of the mean
    is at most sqrt(v (1 - v) / n), and that of a difference of two rows at most
    sqrt(se_a^2 + se_b^2) (unpaired; rows scored on the same users vary less). So a gap called
    real is one that chance alone makes about 1 time in 20 at most, while a gap called noise may
    still be real (a paired test on the per-user scores would be sharper).
  * `next_steps_lines(...)`: how to recommend for your own users with `recommend`
    (`recllm_jax.inference`), how to bring your own data (docs/data.md's JSONL/Parquet schema),
    how to get the Amazon data.

Nothing here names a dataset or a row: `Roles` says what each row is (`results_table.py` derives
it from the files), so the same code reads the demo and the Office run.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MAIN_METRICS", "Roles", "best_of", "gap_is_noise", "next_steps_lines",
           "noise_band", "reading_lines"]

MAIN_METRICS = ("hr@10", "ndcg@10")
PUBLISHED_PREFIX = "published "  # results_table.parse_published's row names


@dataclasses.dataclass(frozen=True)
class Roles:
  """What the rows of a results table are.

  models: our LLM alone, one row per checkpoint (e.g. sft, grpo), in pipeline order.
  trained_from: model row -> the model row it was trained from (grpo -> sft).
  guided: CF-guided row -> the model row whose beam the CF prior was mixed into.
  prior: the CF prior's own ranking (no LLM), or None.
  baselines: the classical recommenders (popularity, markov, sasrec).
  Rows named `published ...` are the dataset README's (other training data): a yardstick only.
  """

  models: tuple[str, ...] = ()
  trained_from: Mapping[str, str] = dataclasses.field(default_factory=dict)
  guided: Mapping[str, str] = dataclasses.field(default_factory=dict)
  prior: str | None = None
  baselines: tuple[str, ...] = ()

  def ours(self) -> tuple[str, ...]:
    """Rows of our models: alone, then CF-guided (the rows with predictions of their own)."""
    return (*self.models, *self.guided)

  def compared(self) -> tuple[str, ...]:
    """Every row that competes for "best": ours, the prior alone and the baselines."""
    return (*self.ours(), *((self.prior,) if self.prior else ()), *self.baselines)


def _value(results: Mapping[str, Mapping[str, Any]], name: str, metric: str) -> float | None:
  value = results.get(name, {}).get(metric)
  if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
    return float(value)
  return None


def _users(results: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> int | None:
  """The smallest `num_examples` of `names` (None when none reports it)."""
  counts = [_value(results, n, "num_examples") for n in names]
  counts = [int(c) for c in counts if c]
  return min(counts) if counts else None


def noise_band(a: float, b: float, n: int | None) -> float:
  """Two standard errors of the gap between means `a` and `b` of n per-user scores in [0, 1]
  (an upper bound, see the module docstring); 0 when n is unknown."""
  if not n:
    return 0.0
  a, b = (min(max(v, 0.0), 1.0) for v in (a, b))
  return 2.0 * math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def gap_is_noise(a: float, b: float, n: int | None) -> bool:
  return abs(a - b) < noise_band(a, b, n)


def best_of(results: Mapping[str, Mapping[str, Any]], names: Sequence[str],
            metric: str) -> str | None:
  """The row of `names` with the highest `metric` (the first on a tie); None if none has it."""
  scored = [(v, -i, n) for i, n in enumerate(names)
            if (v := _value(results, n, metric)) is not None]
  return max(scored)[2] if scored else None


def _num(v: float) -> str:
  return f"{v:.4f}"


def _change(a: float, b: float) -> str:
  """a relative to b: "+8.0%" (or "+0.0100" when b is 0)."""
  return f"{(a - b) / b:+.1%}" if b else f"{a - b:+.4f}"


def _metric_line(results: Mapping[str, Mapping[str, Any]], roles: Roles, metric: str,
                 n: int | None) -> str | None:
  """'hr@10: best ..., level with ...; the model alone ...', or None when no row has it."""
  best = best_of(results, roles.compared(), metric)
  if best is None:
    return None
  top = _value(results, best, metric)
  assert top is not None
  tied = [r for r in roles.compared() if r != best and (v := _value(results, r, metric)) is not None
          and gap_is_noise(top, v, n)]
  line = f"{metric}: best {best} {_num(top)}"
  if tied:
    line += f", level within noise: {', '.join(tied)}"
  alone = [(m, v) for m in roles.models if (v := _value(results, m, metric)) is not None]
  if alone and best not in roles.models:
    parts = [f"{m} {_num(v)}" + (f" ({v / top:.2f}x the best)" if top else "") for m, v in alone]
    line += "; the model alone: " + ", ".join(parts)
  published = [name for name in results if name.startswith(PUBLISHED_PREFIX)]
  pub_best = best_of(results, published, metric)
  if pub_best is not None:
    line += (f"; best published (other training data): "
             f"{pub_best.removeprefix(PUBLISHED_PREFIX)} "
             f"{_num(_value(results, pub_best, metric) or 0.0)}")
  return line


def _compare(results: Mapping[str, Mapping[str, Any]], a: str, b: str,
             metrics: Sequence[str], n: int | None) -> tuple[str, str]:
  """('hr@10 0.3275 vs 0.3125 (+4.8%), ndcg@10 ...', 'above' | 'below' | 'level'): a against b
  on each metric both report. One direction of real gaps (the others noise) gives that
  direction; none, or real gaps both ways, give 'level'."""
  parts, verdicts = [], set()
  for metric in metrics:
    va, vb = _value(results, a, metric), _value(results, b, metric)
    if va is None or vb is None:
      continue
    parts.append(f"{metric} {_num(va)} vs {_num(vb)} ({_change(va, vb)})")
    verdicts.add("level" if gap_is_noise(va, vb, n) or va == vb else
                 "above" if va > vb else "below")
  real = verdicts - {"level"}
  return ", ".join(parts), real.pop() if len(real) == 1 else "level"


_GAP = {"above": "a real gain", "below": "a real loss", "level": "within noise"}
_RANK = {"above": "above", "below": "below", "level": "level with"}
_CF_VERDICT = {
    "level": "the CF-guided rows add nothing measurable over the CF prior alone (at this "
             "cf_weight the prior decides the list)",
    "above": "the LLM adds to the CF prior (the CF-guided rows beat the prior alone)",
    "below": "mixing the LLM into the CF prior hurts (the CF-guided rows are below the prior "
             "alone)",
}


def reading_lines(results: Mapping[str, Mapping[str, Any]], roles: Roles,
                  metrics: Sequence[str] = MAIN_METRICS, width: int = 100) -> list[str]:
  """A few lines saying what the table shows (see the module docstring), wrapped at `width`;
  [] when no row of `roles` reports any of `metrics`."""
  metrics = [m for m in metrics if any(_value(results, r, m) is not None
                                       for r in roles.compared())]
  if not metrics:
    return []
  n = _users(results, roles.compared())
  main = metrics[-1]  # NDCG@10: the ranking metric the pipeline selects on
  top = _value(results, best_of(results, roles.compared(), main) or "", main) or 0.0
  head = "What the table shows"
  if n:
    head += (f" ({n} test examples: gaps under about {noise_band(top, top, n):.2f}, two standard "
             f"errors at the top of {main}, are noise)")
  items = [_metric_line(results, roles, metric, n) for metric in metrics]
  items = [item for item in items if item]
  summary = []

  # The model alone against the best row without an LLM (the prior alone, the baselines).
  others = (*((roles.prior,) if roles.prior else ()), *roles.baselines)
  model, other = best_of(results, roles.models, main), best_of(results, others, main)
  if model and other:
    _, verdict = _compare(results, model, other, metrics, n)
    a, b = _value(results, model, main) or 0.0, _value(results, other, main) or 0.0
    summary.append(f"the model alone is {_RANK[verdict]} the best CF baseline ({model} {main} "
                   f"{_num(a)} vs {other} {_num(b)}" + (f", {a / b:.2f}x)" if b else ")"))

  for tuned, start in roles.trained_from.items():
    if tuned in results and start in results:
      text, verdict = _compare(results, tuned, start, metrics, n)
      items.append(f"{tuned} (trained from {start}) vs {start}: {text}: {_GAP[verdict]}")
      summary.append(f"{tuned} over {start} is {_GAP[verdict]}")

  guided = [g for g in roles.guided if g in results]
  if guided and roles.prior in results:
    best_guided = best_of(results, guided, main) or guided[0]
    text, verdict = _compare(results, best_guided, roles.prior, metrics, n)
    lift = [f"{g} vs {roles.guided[g]} {_change(a, b)}" for g in guided
            if (a := _value(results, g, main)) is not None
            and (b := _value(results, roles.guided[g], main)) is not None]
    prior = roles.prior if "prior" in roles.prior else f"the CF prior alone, {roles.prior}"
    items.append(f"CF-guided (best: {best_guided}) vs {prior}: "
                 f"{text}: {_GAP[verdict]}"
                 + (f"; over the model alone on {main}: {', '.join(lift)}" if lift else ""))
    summary.append(_CF_VERDICT[verdict])

  if summary:
    items.append("In short: " + "; ".join(summary) + ".")
  lines = textwrap.wrap(head + ":", width, subsequent_indent="  ")
  for item in items:
    lines += textwrap.wrap(item, width, initial_indent="  ", subsequent_indent="    ",
                           break_on_hyphens=False)
  return lines


def next_steps_lines(*, workdir: Path, history: Sequence[str],
                     cf: Mapping[str, Any] | None) -> list[str]:
  """Next steps after a run whose best model is in `workdir`: recommend with it (`history`: a
  real history to put in the example), bring your own data, get the Amazon data. `cf`: the best
  row's CF settings (`cf_model`, `cf_weight`, `cf_from` of its eval JSON) when it is CF-guided."""
  w = str(workdir)
  ids = repr([str(i) for i in list(history)[-3:]] or ["ITEM_ID"])
  lines = [
      "Next steps",
      f"  Recommend for your own users with {w} (docs/evaluation.md, The Python API):",
      "    import recllm_jax",
      "    from recllm_jax.data.loading import load_run_data",
      "    from recllm_jax.data.prompts import PromptConfig",
      f"    model, tokenizer, config = recllm_jax.load_checkpoint({w!r})",
      f"    ds, codec = load_run_data(config, {w!r})  # its catalog, as the model writes items",
      "    prompt = PromptConfig(**config.data.prompt.to_dict())",
      f"    me = {ids}  # your user's history: catalog item ids, oldest first",
      "    print(recllm_jax.recommend(model, tokenizer, [me], codec, prompt, k=10))  # best first",
  ]
  if cf:
    name, weight, source = cf.get("cf_model"), cf.get("cf_weight"), cf.get("cf_from")
    sasrec = name in ("sasrec", "mix")
    if source:
      load = (f"load_cf_models({str(source)!r}, ds"
              + (", sasrec=SASRecConfig(seed=config.seed))" if sasrec else ")"))
      lines += [
          (f"  The best row mixes the {name} prior into the beam (docs/evaluation.md, CF-guided "
           "decoding): add"),
          ("    from recllm_jax.rec.cf_prior import load_cf_models, prior_from_models"
           + ("; from recllm_jax.rec.baselines import SASRecConfig" if sasrec else "")),
          f"    prior = prior_from_models({name!r}, {load})",
          f"    recllm_jax.recommend(..., cf_prior=prior, cf_weight={weight:g})" if isinstance(
              weight, (int, float)) else "    recllm_jax.recommend(..., cf_prior=prior, cf_weight=W)",
      ]
    else:
      lines.append(f"  The best row mixes the {name} prior into the beam: recllm_jax.recommend(..., "
                   f"cf_prior=fit_prior({name!r}, ds), cf_weight={weight}) "
                   "(recllm_jax.rec.cf_prior; docs/evaluation.md, CF-guided decoding)")
  lines += [
      "  Your own data (docs/data.md, JSONL format): a folder with catalog.jsonl, one item a line",
      '    {"item_id": "P1", "title": "...", ...any attributes}, and interactions.jsonl, one user',
      '    a line {"user_id": "U1", "history": ["P1", "P7", ...]} (oldest first; optional',
      '    "targets", "split", "profile"), or the same tables as .parquet; then',
      "    FORMAT=jsonl bash scripts/reproduce.sh YOUR_DIR workdirs/yours",
      "  Amazon data (docs/data.md, Amazon Reviews 2018): a folder with items.json, valid.csv,",
      "    test.csv (info.txt optional), the published valid/test splits of one category from",
      "    the MiniOneRec repository's data/Amazon/ (e.g. Office_Products); then",
      "    bash scripts/reproduce.sh THAT_DIR workdirs/office",
  ]
  return lines
