"""scripts/evaluate.py: evaluates a trained workdir with the training config; its JSON metrics
are exactly `evaluate_rankings` of the predictions it writes; user errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recllm_jax.data import load_dataset, popularity
from recllm_jax.data.synthetic import generate_synthetic
from recllm_jax.rec.metrics import evaluate_rankings

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "train"))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)
from test_grpo import SFT, configure  # noqa: E402  (the fast tiny SFT setup)

CONFIG = str(REPO / "configs" / "sft.py") + ":tiny"
RUN = {**SFT, "data.prompt.target_format": "direct"}


def _flag(key: str, value) -> str:
  return f"--config.{key}={value}"


def evaluate(workdir: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
  """The CLI on 2 host devices (a small mesh starts fast), with the training overrides."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--config", CONFIG,
         _flag("workdir", workdir), _flag("data.dir", data),
         *(_flag(k, v) for k, v in RUN.items()), *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
  """(workdir, data dir) of a tiny direct-format SFT run."""
  from recllm_jax.train.loop import train

  root = tmp_path_factory.mktemp("evaluate")
  data = generate_synthetic(root / "data", num_items=60, num_users=60, seed=0)
  train(configure(sft_configs.get_config("tiny"), workdir=str(root / "sft"),
                  **{"data.dir": str(data)}, **RUN))
  return root / "sft", data


def test_eval_json_is_evaluate_rankings_of_the_predictions(run):
  workdir, data = run
  done = evaluate(workdir, data, "--split=test", "--k=5", "--max_examples=12", "--batch_size=4")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "examples/s" in done.stdout and "hr@5" in done.stdout, done.stdout
  metrics = json.loads((workdir / "eval_test.json").read_text())
  rows = [json.loads(line) for line in
          (workdir / "predictions_test.jsonl").read_text().splitlines()]
  ds = load_dataset(data, "synthetic")
  examples = ds.test[:12]
  assert [r["user_id"] for r in rows] == [ex.user_id for ex in examples]
  assert [r["targets"] for r in rows] == [list(ex.targets) for ex in examples]
  assert [r["history"] for r in rows] == [list(ex.history) for ex in examples]
  for r in rows:  # beam mode: k distinct catalog items, titles aligned with ids
    assert len(r["ranked"]) == 5 == len(set(r["ranked"]))
    assert r["titles"] == [ds.catalog.title(i) for i in r["ranked"]]
  expected = evaluate_rankings([r["ranked"] for r in rows], examples, ds.catalog,
                               popularity(ds.train), ks=(1, 3, 5))
  assert {key: metrics[key] for key in expected} == expected
  assert metrics["num_examples"] == 12 and metrics["examples_per_s"] > 0
  assert "hr@10" not in metrics  # cut-offs above k would only restate hr@5
  # Histories longer than the prompt budget are cut (newest items kept) and counted.
  import transformers

  from recllm_jax.data.prompts import PromptConfig, render_history
  tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "tokenizer")
  prompt_cfg = PromptConfig(**json.loads((workdir / "config.json").read_text())["data"]["prompt"])
  cut = sum(render_history(ex, ds.catalog, tokenizer, prompt_cfg)[1] < len(ex.history)
            for ex in examples)
  assert cut > 0 and metrics["histories_cut"] == cut  # the 40-token budget cuts synthetic ones
  assert f"{cut} histories cut to the prompt budget" in done.stdout, done.stdout


def test_missing_workdir_is_a_one_line_error(tmp_path, run):
  _, data = run
  done = evaluate(tmp_path / "nowhere", data)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: MissingPathError"), done.stderr[-2000:]
  assert str(tmp_path / "nowhere") in lines[0]


def test_workdir_without_a_finished_checkpoint_is_a_one_line_error(tmp_path, run):
  import shutil

  trained, data = run
  workdir = tmp_path / "unsaved"  # a run stopped during its first save
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("checkpoints"))
  (workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
  done = evaluate(workdir, data)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: MissingPathError"), done.stderr[-2000:]
  assert f"{workdir / 'checkpoints'} holds no finished checkpoint" in lines[0]


@pytest.fixture(scope="module")
def fingerprinted(tmp_path_factory) -> tuple[Path, Path]:
  """(workdir, data dir): a workdir as training starts it, with its config.json and the
  fingerprint of its data, but no checkpoint (the catalog is checked before any model loads)."""
  from recllm_jax import paths
  from recllm_jax.rec.cf_prior import data_fingerprint
  from recllm_jax.train import drift
  from recllm_jax.train.loop import save_config

  root = tmp_path_factory.mktemp("fingerprinted")
  data = generate_synthetic(root / "data", num_items=60, num_users=20, seed=0)
  workdir = paths.workdir_path(root / "run")
  workdir.mkdir()
  save_config(configure(sft_configs.get_config("tiny"), workdir=str(workdir),
                        **{"data.dir": str(data)}, **RUN), workdir)
  drift.check_data(data_fingerprint(load_dataset(data, "synthetic")), workdir, resuming=False)
  return Path(workdir), data


def test_data_with_another_catalog_is_a_one_line_error_before_the_model_loads(fingerprinted,
                                                                                 tmp_path):
  workdir, _ = fingerprinted
  other = generate_synthetic(tmp_path / "other", num_items=50, num_users=20, seed=0)
  done = evaluate(workdir, other)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: CatalogMismatchError"), \
    done.stderr[-2000:]
  assert f"data.dir={str(other)!r} has another catalog than the one {workdir} was trained on " \
         "(60 items -> 50;" in lines[0], lines[0]


def test_check_trained_catalog_compares_the_item_ids_in_order(fingerprinted, tmp_path):
  from recllm_jax.data import Catalog, RecDataset
  from recllm_jax.inference import CatalogMismatchError, check_trained_catalog

  workdir, data = fingerprinted
  ds = load_dataset(data, "synthetic")
  check_trained_catalog(ds, workdir, data)  # the data it was trained on
  check_trained_catalog(ds, tmp_path, data)  # no fingerprint saved: nothing to compare
  reordered = RecDataset(Catalog(reversed(list(ds.catalog))), ds.train, ds.valid, ds.test)
  with pytest.raises(CatalogMismatchError, match="60 items either way, but other ids or another "
                                                 "order; items_sha256 of its data_fingerprint"):
    check_trained_catalog(reordered, workdir, data)


def test_cot_constrained_on_a_direct_config_is_a_one_line_error(run):
  workdir, data = run
  done = evaluate(workdir, data, "--mode=cot_constrained")
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "target_format='cot'" in lines[0], done.stderr[-2000:]


def test_cf_guided_beam_writes_its_settings_and_the_prior_alone(run, tmp_path):
  import shutil

  from recllm_jax.rec.cf_prior import fit_prior

  workdir = tmp_path / "sft"
  shutil.copytree(run[0], workdir)  # the other tests read the shared workdir's eval_test.json
  data = run[1]
  done = evaluate(workdir, data, "--split=test", "--k=5", "--max_examples=12", "--batch_size=4",
                  "--cf_model=markov", "--cf_weight=2", "--cf_smoothing=0.2", "--tag=cf")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "markov prior alone" in done.stdout, done.stdout
  # --tag names the files, so the plain evaluation's are kept (scripts/reproduce.sh runs both).
  assert (workdir / "predictions_test_cf.jsonl").is_file()
  if (run[0] / "eval_test.json").is_file():
    assert (workdir / "eval_test.json").read_bytes() == (run[0] / "eval_test.json").read_bytes()
  metrics = json.loads((workdir / "eval_test_cf.json").read_text())
  assert (metrics["cf_model"], metrics["cf_weight"], metrics["cf_smoothing"]) == ("markov", 2.0, 0.2)
  ds = load_dataset(data, "synthetic")
  examples = ds.test[:12]
  alone = fit_prior("markov", ds, smoothing=0.2).recommend(examples, 5)
  expected = evaluate_rankings(alone, examples, ds.catalog, popularity(ds.train), ks=(1, 3, 5))
  assert json.loads((workdir / "eval_test_cf_markov.json").read_text()) == expected

  # --cf_from: the models scripts/baselines.py saves give the same beams as fitting in place.
  from recllm_jax.rec.cf_prior import fit_cf_models, save_cf_models
  save_cf_models(fit_cf_models(ds, sasrec=None), tmp_path / "baselines")
  done = evaluate(workdir, data, "--split=test", "--k=5", "--max_examples=12", "--batch_size=4",
                  "--cf_model=markov", "--cf_weight=2", "--cf_smoothing=0.2", "--tag=cf_from",
                  f"--cf_from={tmp_path / 'baselines'}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert ((workdir / "predictions_test_cf_from.jsonl").read_bytes()
          == (workdir / "predictions_test_cf.jsonl").read_bytes())


def test_cf_from_models_of_other_data_is_a_one_line_error(run, tmp_path):
  from recllm_jax.data import RecDataset
  from recllm_jax.rec.cf_prior import fit_cf_models, save_cf_models

  workdir, data = run
  ds = load_dataset(data, "synthetic")
  other = RecDataset(ds.catalog, ds.train[1:], valid=ds.valid, test=ds.test)
  save_cf_models(fit_cf_models(other, sasrec=None), tmp_path)
  done = evaluate(workdir, data, "--max_examples=4", "--cf_model=markov", f"--cf_from={tmp_path}",
                  "--tag=mismatch")
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "CFModelsMismatch" in lines[0] and "other data" in lines[0], \
    done.stderr[-2000:]
  assert not (workdir / "eval_test_mismatch.json").exists()


def test_cf_model_outside_beam_mode_is_a_one_line_error(run):
  workdir, data = run
  done = evaluate(workdir, data, "--mode=sample", "--cf_model=markov")
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "--mode=beam" in lines[0], done.stderr[-2000:]
