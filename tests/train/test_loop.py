"""End-to-end train loop: outputs, resume after SIGKILL, NaN stop, bad data, config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recllm_jax.data.errors import DataError
from recllm_jax.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)

# A very small model, data and schedule: seconds per run on a CPU.
SMALL = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
    "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
    "model.tokenizer_vocab_size": 320, "data.max_length": 64, "data.num_buckets": 1,
    "data.prompt.max_history_tokens": 40, "data.prefetch_threads": 0,
    # Prompts are never cut, only their history: with a 320-token BPE the default wording alone
    # is ~190 tokens, so a 64-token budget needs terse prompts ("1. <title>\nNext:").
    "data.prompt.user_template": "{history}{instruction}", "data.prompt.instruction": "Next:",
    "data.prompt.history_header": "", "data.prompt.history_attributes": (),
    "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2, "train.log_every": 1,
    "train.eval_every": 0, "train.num_steps": 10, "train.checkpoint_every": 5,
    "train.peak_flops": 1e12,  # skip measuring the CPU matmul peak
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return generate_synthetic(tmp_path_factory.mktemp("data"), num_items=60, num_users=50, seed=0)


ARCH_KEYS = tuple(f"model.{k}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads"))


def make_config(workdir: Path, data: Path, **overrides):
  config = sft_configs.get_config("tiny")
  small = dict(SMALL)
  if overrides.get("model.preset") == "hf":
    # The checkpoint defines the architecture; overriding it would be a ConfigError.
    small = {k: v for k, v in small.items() if k not in ARCH_KEYS}
  config.update_from_flattened_dict({**small, "workdir": str(workdir), "data.dir": str(data),
                                     **overrides})
  return config


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_config_tensorboard_and_checkpoints(tmp_path, data_dir):
  from recllm_jax.train.loop import train

  train(make_config(tmp_path, data_dir, **{"train.eval_every": 5, "train.eval_batches": 2}))
  rows = read_metrics(tmp_path)
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 11))
  for key in ("loss", "learning_rate", "tokens_per_sec", "mfu", "grad_norm", "host_rss_mb",
              "xla_compiles"):
    assert all(key in r for r in steps), key
  assert steps[-1]["xla_compiles"] >= steps[0]["xla_compiles"] > 0 and steps[0]["host_rss_mb"] > 0
  assert steps[-1]["loss"] < steps[0]["loss"]
  assert [r["step"] for r in rows if "val_loss" in r] == [5, 10]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 10
  assert any((tmp_path / "tensorboard").iterdir())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]
  # Running again is a no-op resume: already at num_steps.
  train(make_config(tmp_path, data_dir, **{"train.eval_every": 5, "train.eval_batches": 2}))
  assert read_metrics(tmp_path) == rows


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  from recllm_jax.train.loop import NonFiniteLossError, train

  config = make_config(tmp_path, data_dir, **{"train.lr": 1e10, "train.warmup_steps": 0,
                                              "train.checkpoint_every": 1})
  with pytest.raises(NonFiniteLossError, match=r"step \d+: loss=nan.*Last good checkpoint"):
    train(config)
  bad_step = len(read_metrics(tmp_path)) + 1
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved and max(saved) == bad_step - 1


def test_bad_data_errors_with_file_and_line_or_is_skipped(tmp_path, data_dir):
  from recllm_jax.train.loop import train

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "catalog.jsonl").write_text((data_dir / "catalog.jsonl").read_text())
  lines = (data_dir / "interactions.jsonl").read_text().splitlines()
  lines.insert(2, '{"user_id": "broken", "history": [')
  (bad / "interactions.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"interactions.jsonl:3"):
    train(make_config(tmp_path / "w1", bad, **{"data.format": "jsonl"}))
  train(make_config(tmp_path / "w2", bad, **{"data.format": "jsonl", "data.on_bad_data": "skip",
                                             "train.num_steps": 1}))
  assert len(read_metrics(tmp_path / "w2")) == 1


def _cli(workdir: Path, data: Path, **overrides) -> list[str]:
  args = {**SMALL, "workdir": str(workdir), "data.dir": str(data), **overrides}
  return [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
          str(REPO / "configs" / "sft.py") + ":tiny",
          *(f"--config.{k}={v}" for k, v in args.items())]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # small mesh, fast start
  return env


def test_resume_after_sigkill_reproduces_uninterrupted_losses(tmp_path, data_dir):
  # Slower steps (bigger batch) so the run is still going when the first checkpoint lands.
  run = {"train.num_steps": 20, "train.checkpoint_every": 10, "train.batch_size": 16,
         "data.max_length": 128, "data.prompt.max_history_tokens": 100}
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  # The uninterrupted reference runs alongside the run that gets killed.
  log = open(tmp_path / "reference.log", "w")
  reference = subprocess.Popen(_cli(ref, data_dir, **run), env=_env(), stdout=log, stderr=log)
  proc = subprocess.Popen(_cli(killed, data_dir, **run), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (killed / "checkpoints" / "10").exists() and time.time() < deadline:
    assert proc.poll() is None, "run ended before its first checkpoint"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [r["step"] for r in read_metrics(killed)]
  assert done[-1] < 20, "the run finished before it was killed"
  assert reference.wait() == 0, (tmp_path / "reference.log").read_text()[-2000:]

  subprocess.run(_cli(killed, data_dir, **run), check=True, env=_env(), capture_output=True)
  expected = {r["step"]: r["loss"] for r in read_metrics(ref)}
  got = {r["step"]: r["loss"] for r in read_metrics(killed)}
  assert sorted(got) == list(range(1, 21))
  for step in range(1, 21):
    assert got[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.parametrize("args, message", [
    # Rejected while absl parses the flags.
    ([":tiny", "--config.train.num_stepz=3"],
     'error: --config.train.num_stepz=3: no such config key. Did you mean "num_steps"'),
    ([":tinyy"], "error: --config: unknown preset 'tinyy' for configs/sft.py"),
    # Rejected by the start-up checks of train().
    (["", "--config.model.hf_path=/nonexistent/r1"],
     "huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ([":tiny", "--config.model.hf_path=/x"],
     "ConfigError: model.preset='tiny' (random init) and model.hf_path='/x'"),
    ([":tiny", "--config.train.batch_size=3"],  # 2 devices in _env()
     "ConfigError: train.batch_size=3 must be a positive multiple of mesh.data=1 x mesh.fsdp=2"),
    ([":tiny", "--config.data.format=jsonl", "--config.train.peak_flops=1e12"],  # empty data dir
     "DataError: "),
])
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, args, message):
  (tmp_path / "data").mkdir()
  config, *flags = args
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
       str(REPO / "configs" / "sft.py") + config, f"--config.workdir={tmp_path / 'w'}",
       f"--config.data.dir={tmp_path / 'data'}", *flags],
      capture_output=True, text=True, env=_env())
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
  assert message in proc.stderr


def test_configs_are_locked():
  config = sft_configs.get_config("tiny")
  with pytest.raises(AttributeError):
    config.train.num_stepz = 3
  with pytest.raises(ValueError, match="unknown preset"):
    sft_configs.get_config("tinyy")
  assert sft_configs.get_config().model.preset == "hf"


def test_sigterm_stops_at_a_step_boundary_and_saves(tmp_path, data_dir):
  run = {"train.num_steps": 100000, "train.checkpoint_every": 100000}
  proc = subprocess.Popen(_cli(tmp_path, data_dir, **run), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0
  last = read_metrics(tmp_path)[-1]["step"]
  assert os.listdir(tmp_path / "checkpoints") == [str(last)]


def test_trains_from_an_hf_checkpoint(tmp_path, data_dir, hf_checkpoint):
  import numpy as np
  import torch

  from recllm_jax.data.tokenizer import train_bpe_tokenizer
  from recllm_jax.train.loop import make_task, train

  hf_dir, hf_model = hf_checkpoint(vocab_size=320)
  texts = [line for line in (data_dir / "catalog.jsonl").read_text().splitlines()]
  train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=320)
  config = make_config(tmp_path / "w", data_dir, **{
      "model.preset": "hf", "model.hf_path": str(hf_dir), "model.tokenizer_path":
      str(tmp_path / "tok"), "model.dtype": "bfloat16", "model.remat": True,
      "train.num_steps": 3})
  row = train(config)
  assert row["step"] == 3
  # Step 1's loss is computed before its update, so it must be the fp32 torch model's masked
  # token cross-entropy on the first batch (a fresh iterator yields the same batch). bf16
  # compute moves it by ~2e-4; unloaded weights or a mask off by one position move it by >5e-3.
  batch = next(make_task(config, tmp_path / "w").train_iterator())
  ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
  with torch.no_grad():
    logits = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits
  ce = torch.nn.functional.cross_entropy(  # [B, T]
      logits.transpose(1, 2), torch.tensor(batch["targets"]).long(), reduction="none").numpy()
  expected = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  assert read_metrics(tmp_path / "w")[0]["loss"] == pytest.approx(expected, abs=1e-3)


def test_model_config_derives_head_dim_from_the_overridden_sizes(tmp_path, data_dir):
  from recllm_jax.train.build import model_config

  cfg = model_config(make_config(tmp_path, data_dir).model, vocab_size=320)
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (32, 4, 8)


@pytest.mark.parametrize("overrides, error, message", [
    # 8 devices; a missing data dir too, which must not be reached first.
    ({"train.batch_size": 12, "train.grad_accum_steps": 2}, "ConfigError",
     "train.batch_size=12 must be a positive multiple of mesh.data=1 x mesh.fsdp=8 (-1: the "
     "remaining devices) x train.grad_accum_steps=2 = 16"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.batch_size": 6}, "ConfigError",
     "train.batch_size=6 must be a positive multiple of mesh.data=2 x mesh.fsdp=2 x "
     "train.grad_accum_steps=1 = 4"),
    ({"mesh.data": 3}, "ConfigError", "mesh.data=3 mesh.fsdp=-1 mesh.tensor=1: 8 devices"),
    ({"model.hf_path": "/some/r1"}, "ConfigError",
     "model.preset='tiny' (random init) and model.hf_path='/some/r1' (pretrained weights) are "
     "both set"),
    ({"model.preset": "hf", "model.hf_path": "/some/r1", "model.hidden_size": 64}, "ConfigError",
     "model.hidden_size=64 only apply to a random init, but model.preset='hf'"),
    ({"model.preset": "tinyy"}, "ConfigError", "model.preset='tinyy' is unknown"),
    ({"train.log_every": -1}, "ConfigError", "train.log_every=-1 must be a step interval >= 0"),
    ({"train.grad_accum_steps": 0}, "ConfigError", "train.grad_accum_steps=0 must be >= 1"),
    ({"data.format": "jsonl", "data.dir": "/nonexistent/data"}, "MissingPathError",
     "data.dir='/nonexistent/data' is not a "
     "directory"),
    ({"model.tokenizer_path": "/nonexistent/tok"}, "MissingPathError",
     "model.tokenizer_path='/nonexistent/tok' does not exist"),
])
def test_start_up_checks_name_the_keys_before_anything_loads(tmp_path, overrides, error,
                                                              message):
  from recllm_jax.errors import UserError
  from recllm_jax.train.loop import train

  (tmp_path / "data").mkdir()
  config = make_config(tmp_path / "w", tmp_path / "data", **overrides)
  with pytest.raises(UserError, match=re.escape(message)) as info:
    train(config)
  # One error raises itself; several (here: also a missing model.hf_path) come together.
  errors = getattr(info.value, "errors", [info.value])
  assert any(type(e).__name__ == error and message in str(e) for e in errors), errors
  assert not (tmp_path / "w").exists()  # failed before creating (or loading) anything


def test_check_batch_split_takes_derived_row_counts():
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.checks import check_batch_split

  factors = [("mesh.fsdp=8", 8), ("train.grad_accum_steps=2", 2)]
  check_batch_split(("train.batch_size x grpo.num_generations", 4 * 8), factors)
  with pytest.raises(ConfigError, match=re.escape(
      "train.batch_size x grpo.num_generations=24 must be a positive multiple of mesh.fsdp=8 x "
      "train.grad_accum_steps=2 = 16")):
    check_batch_split(("train.batch_size x grpo.num_generations", 3 * 8), factors)


def test_expand_paths_expands_user_and_variables_in_path_keys_only(monkeypatch):
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.checks import expand_paths

  monkeypatch.setenv("HOME", "/home/someone")
  monkeypatch.setenv("DATA_ROOT", "/mnt/data")
  config = sft_configs.get_config("tiny")
  config.workdir = "~/runs/x"
  config.data.dir = "${DATA_ROOT}/office"
  config.model.tokenizer_path = "$DATA_ROOT/tok"
  config.data.prompt.instruction = "~ $DATA_ROOT"  # not a path: untouched
  expanded = expand_paths(config)
  assert (expanded.workdir, expanded.data.dir, expanded.model.tokenizer_path) == (
      "/home/someone/runs/x", "/mnt/data/office", "/mnt/data/tok")
  assert expanded.data.prompt.instruction == "~ $DATA_ROOT"
  assert config.workdir == "~/runs/x"  # the caller's config is not modified
  config.model.hf_path = "$NOT_SET_ANYWHERE/r1"
  monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
  with pytest.raises(ConfigError, match="model.hf_path=.*NOT_SET_ANYWHERE is not set"):
    expand_paths(config)


def test_is_due_treats_zero_as_never():
  from recllm_jax.train.checks import is_due

  assert [s for s in range(1, 11) if is_due(s, 4)] == [4, 8]
  assert not any(is_due(s, 0) for s in range(1, 11))


def test_zero_intervals_mean_never_but_the_final_save_happens(tmp_path, data_dir, monkeypatch):
  from recllm_jax.train.loop import train

  # Paths as a user would type them: `~` and `$VAR` are expanded by train().
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("RECLLM_TEST_DATA", str(data_dir))
  config = make_config(Path("~/run"), Path("$RECLLM_TEST_DATA"), **{
      "train.num_steps": 3, "train.log_every": 0, "train.eval_every": 0,
      "train.checkpoint_every": 0})
  assert train(config) == {}  # nothing logged
  workdir = tmp_path / "run"
  assert not (workdir / "metrics.jsonl").exists() or not read_metrics(workdir)
  assert os.listdir(workdir / "checkpoints") == ["3"]
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["workdir"], saved["data"]["dir"]) == (str(workdir), str(data_dir))


def test_vocabulary_larger_than_the_checkpoint_grows_it(tmp_path, hf_checkpoint):
  from recllm_jax import sharding
  from recllm_jax.train.build import build_model

  hf_dir, _ = hf_checkpoint(vocab_size=128)
  config = make_config(tmp_path, tmp_path, **{"model.preset": "hf", "model.hf_path": str(hf_dir)})
  tokenizer = [f"token{i}" for i in range(300)]  # only len() is used
  # Added tokens (tests/models/test_vocab.py): grown to 300 rounded up to a multiple of 64.
  assert build_model(config, sharding.make_mesh(), tokenizer).cfg.vocab_size == 320
