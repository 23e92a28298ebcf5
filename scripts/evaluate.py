"""Evaluate a trained LLM recommender: `python scripts/evaluate.py --config <training config>
--config.workdir=W --split test`.

Takes the same config file (and `--config.key=value` overrides) the model was trained with, so
the data, prompts and mesh match training; restores the latest checkpoint in W (`--step N` for
another one) with `recllm_jax.load_checkpoint`, or evaluates an HF directory instead with
`--hf_dir D` (its own tokenizer, the config's data and prompts). Each example of `--split` gets a
ranked top-`--k` list from `recllm_jax.inference.recommend` (default: constrained beam search with
k beams), scored by `recllm_jax.rec.metrics.evaluate_rankings`, the harness of the baselines.

CF-guided decoding (D3; docs/evaluation.md): `--cf_model markov|sasrec|mix --cf_weight W` fits
that collaborative-filtering model on the training split (as scripts/baselines.py does) and
ranks by `log p_LLM(title) + W * log p_CF(item | history)` inside the beam. `--cf_from D` builds
that prior from the models scripts/baselines.py saved in its workdir D (cf_models.json +
cf_models.npz) instead of fitting them again: the same prior (same data, same SASRec config and
seed, so the same parameters), without SASRec's minutes of training. It refuses, with one line
and exit status 2, models fitted on other data (catalog, train or valid examples differ) or with
another SASRec config than the one fitted in place (configs/baselines.py defaults, this seed).

Writes into W:
  eval_<split>.json         flat metric keys (hr@10, ndcg@10, ...), plus examples_per_s,
                            histories_cut (examples whose history was longer than
                            data.prompt.max_history_tokens: their prompts show the newest
                            items) and, with a CF model, cf_model / cf_weight /
                            cf_smoothing / cf_from (the --cf_from folder, "" when fitted in
                            place)
  predictions_<split>.jsonl one line per example: user_id, history, targets, ranked ids, titles
  (with `--tag T`: eval_<split>_T.json and predictions_<split>_T.jsonl instead)
  eval_<split>_cf_<model>.json  with --cf_model: the CF prior's own ranking (no LLM), same keys

A user error (a bad flag or config value, a missing workdir or checkpoint, bad data, a data.dir
whose catalog is not the one the checkpoint was trained on) ends with one line `error: ...` on
stderr and exit status 2, like scripts/train.py.
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

MODES = ("beam", "cot_constrained", "sample")  # recllm_jax.inference.MODES (not imported: fast --help)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Split to evaluate on.")
_K = flags.DEFINE_integer("k", 20, "List length (beams in beam mode); metrics at 1,3,5,10,20 <= k.")
_MODE = flags.DEFINE_enum("mode", "beam", list(MODES), "How ranked lists are decoded.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples (0 = all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Prompts per decoder call.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Evaluate this HF directory instead of a checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 0, "Samples per prompt in sampling modes "
                                    "(0 = k).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (sampling modes).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0, "Decode steps (0 = longest title + "
                                       "EOS for beam, 256 for sampling).")
_EXCLUDE_HISTORY = flags.DEFINE_bool("exclude_history", False, "Never recommend history items.")
CF_MODELS = ("markov", "sasrec", "mix")  # recllm_jax.rec.cf_prior.CF_MODELS (fast --help)
_TAG = flags.DEFINE_string("tag", "", "Suffix of the output files (eval_<split>_<tag>.json, "
                           "predictions_<split>_<tag>.jsonl), so runs with other settings "
                           "keep the default files.")
_CF_MODEL = flags.DEFINE_enum("cf_model", "none", ["none", *CF_MODELS],
                              "CF prior mixed into the beam (CF-guided decoding, beam mode only).")
_CF_WEIGHT = flags.DEFINE_float("cf_weight", 1.0, "Weight of log p_CF in the beam score "
                                "(with --cf_model).")
_CF_FROM = flags.DEFINE_string("cf_from", None, "Load the CF models scripts/baselines.py saved "
                               "in this workdir instead of fitting them (with --cf_model).")
_CF_SMOOTHING = flags.DEFINE_float("cf_smoothing", 0.1, "Popularity share mixed into the CF "
                                   "prior so every item has mass (with --cf_model).")

KS = (1, 3, 5, 10, 20)


def load_model(config, workdir: Path, mesh):
  """(model, tokenizer) from `--hf_dir` or the workdir's checkpoint."""
  from recllm_jax.errors import MissingPathError

  if _HF_DIR.value:
    import transformers

    from recllm_jax.models.qwen2_hf import load_hf_model
    path = Path(_HF_DIR.value)
    if not (path / "config.json").is_file():
      raise MissingPathError(f"--hf_dir={path}: no config.json; expected an HF model directory")
    model = load_hf_model(path, dtype=config.model.param_dtype, mesh=mesh,
                          compute_dtype=config.model.dtype,
                          attention=config.model.get("attention", "auto"))
    return model, transformers.AutoTokenizer.from_pretrained(path)
  import recllm_jax
  model, tokenizer, _ = recllm_jax.load_checkpoint(workdir, _STEP.value, mesh=mesh)
  return model, tokenizer


def require_run(workdir: Path) -> None:
  """`workdir` holds a trained run (checked before the data is read)."""
  from recllm_jax.errors import MissingPathError

  if not (workdir / "config.json").is_file():
    raise MissingPathError(f"--config.workdir={workdir} holds no trained run (no config.json); "
                           "train first (scripts/train.py) or pass --hf_dir")


def prediction_rows(examples, rankings, catalog):
  """One JSON-ready dict per example (the jsonl lines)."""
  for ex, ranked in zip(examples, rankings):
    yield {"user_id": ex.user_id, "history": list(ex.history), "targets": list(ex.targets),
           "ranked": ranked,
           "titles": [catalog.title(i) if i is not None and i in catalog else None
                      for i in ranked]}


def main(argv: list[str]) -> None:
  start_script(argv)
  if _K.value < 1 or _BATCH_SIZE.value < 1 or _MAX_EXAMPLES.value < 0:
    fail(f"--k={_K.value}, --batch_size={_BATCH_SIZE.value} must be >= 1 and --max_examples="
         f"{_MAX_EXAMPLES.value} >= 0")
  cf_model = None if _CF_MODEL.value == "none" else _CF_MODEL.value
  if cf_model and _MODE.value != "beam":
    fail(f"--cf_model={cf_model} mixes a CF score into beam search: it needs --mode=beam, got "
         f"--mode={_MODE.value}")
  if cf_model and not _CF_WEIGHT.value >= 0:
    fail(f"--cf_weight={_CF_WEIGHT.value} must be >= 0")
  if _CF_FROM.value and not cf_model:
    fail(f"--cf_from={_CF_FROM.value} loads the models of a CF prior: it needs --cf_model")
  # Imported after flag parsing so that --help stays fast.
  from recllm_jax import sharding
  from recllm_jax.data import popularity
  from recllm_jax.data.loading import data_dir, load_run_data
  from recllm_jax.train import drift
  from recllm_jax.data.errors import DataError
  from recllm_jax.data.prompts import PromptConfig
  from recllm_jax.errors import ConfigError, UserError
  from recllm_jax.inference import check_trained_catalog, mode_prompt_config, recommend
  from recllm_jax.rec import Grounder
  from recllm_jax.rec.metrics import evaluate_rankings, format_table
  from recllm_jax.train.checks import expand_paths

  config = load_config()
  split, k, mode = _SPLIT.value, _K.value, _MODE.value
  try:
    config = expand_paths(config)
    workdir = Path(config.workdir)
    prompt_cfg = PromptConfig(**config.data.prompt.to_dict())
    try:
      mode_prompt_config(prompt_cfg, mode)
    except ValueError as e:
      raise ConfigError(f"--mode={mode}: {e}") from None
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    sasrec = None
    cf_models = None
    if cf_model:
      from recllm_jax.rec.baselines import SASRecConfig
      from recllm_jax.rec.cf_prior import fit_prior, load_cf_models, prior_from_models
      # configs/baselines.py's SASRec defaults and this config's seed (0: the baseline's).
      sasrec = SASRecConfig(seed=config.seed)
    # The workdir, the data's catalog and a saved CF fit are checked against each other before
    # the checkpoint is restored, so that a mismatch ends the run at once, with one line.
    if not _HF_DIR.value:
      require_run(workdir)
      drift.check_item_codes(config, workdir, "--config.workdir")
    dataset, codec = load_run_data(config, workdir)
    if not _HF_DIR.value:
      check_trained_catalog(dataset, workdir, data_dir(config, workdir))
    if _CF_FROM.value:
      cf_models = load_cf_models(Path(_CF_FROM.value).expanduser(), dataset,
                                 sasrec=sasrec if cf_model in ("sasrec", "mix") else None)
    model, tokenizer = load_model(config, workdir, mesh)
    examples = dataset.split(split)
    if _MAX_EXAMPLES.value:
      examples = examples[:_MAX_EXAMPLES.value]
    if not examples:
      raise DataError(f"the {split!r} split is empty; nothing to evaluate")
    train_popularity = popularity(dataset.train)
    grounder = Grounder(codec, popularity=train_popularity)  # as GRPO grounds answers
    cf_prior = None
    if cf_model:
      if cf_models is not None:
        cf_prior = prior_from_models(cf_model, cf_models, smoothing=_CF_SMOOTHING.value)
      else:
        cf_prior = fit_prior(cf_model, dataset, smoothing=_CF_SMOOTHING.value, sasrec=sasrec,
                             progress=True)
    start = time.perf_counter()
    rankings = recommend(model, tokenizer, examples, codec, prompt_cfg, k=k, mode=mode,
                         batch_size=_BATCH_SIZE.value, num_samples=_NUM_SAMPLES.value or None,
                         max_new_tokens=_MAX_NEW_TOKENS.value or None,
                         temperature=_TEMPERATURE.value, exclude_history=_EXCLUDE_HISTORY.value,
                         rng=config.seed, grounder=grounder, mesh=mesh,
                         progress=True, cf_weight=_CF_WEIGHT.value,
                         # The same prior, computed 512 examples at a time (SASRec's batch).
                         cf_prior=None if cf_prior is None else cf_prior.chunked(examples))
    seconds = time.perf_counter() - start
  except UserError as e:
    fail(f"{type(e).__name__}: {e}")
  ks = [c for c in KS if c <= k] or [k]
  metrics = evaluate_rankings(rankings, examples, dataset.catalog, train_popularity, ks)
  metrics.update(examples_per_s=len(examples) / seconds, seconds=seconds,
                 histories_cut=rankings.histories_cut)
  workdir.mkdir(parents=True, exist_ok=True)
  table = {f"llm ({mode})": metrics}
  written = []
  if cf_model:
    metrics.update(cf_model=cf_model, cf_weight=_CF_WEIGHT.value, cf_smoothing=_CF_SMOOTHING.value,
                   cf_from=_CF_FROM.value or "")
    table = {f"llm ({mode}) + {cf_model} x {_CF_WEIGHT.value:g}": metrics}
    # The ablation: the CF prior's own ranking, so that the LLM's contribution is visible.
    alone = evaluate_rankings(cf_prior.recommend(examples, k), examples, dataset.catalog,
                              train_popularity, ks)
    table[f"{cf_model} prior alone"] = alone
    cf_out = workdir / f"eval_{split}_cf_{cf_model}.json"
    cf_out.write_text(json.dumps(alone, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written.append(cf_out)
  name = f"{split}_{_TAG.value}" if _TAG.value else split
  out = workdir / f"eval_{name}.json"
  out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  predictions = workdir / f"predictions_{name}.jsonl"
  with predictions.open("w", encoding="utf-8") as f:
    for row in prediction_rows(examples, rankings, dataset.catalog):
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  source = _HF_DIR.value or str(workdir)
  print(f"\n{split}: {len(examples)} examples, {len(dataset.catalog)} catalog items, mode={mode}, "
        f"k={k}, {len(examples) / seconds:.1f} examples/s ({seconds:.1f}s); "
        f"{rankings.histories_cut} histories cut to the prompt budget (their newest items kept, "
        f"data.prompt.max_history_tokens={prompt_cfg.max_history_tokens})")
  print(format_table(table))
  print(f"model {source}\nwrote {', '.join(map(str, [out, predictions, *written]))}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
