"""End-to-end train loop: outputs, resume after SIGKILL, NaN stop, bad data, config errors."""

from __future__ import annotations

import json
import os
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
    "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2, "train.log_every": 1,
    "train.eval_every": 0, "train.num_steps": 10, "train.checkpoint_every": 5,
    "train.peak_flops": 1e12,  # skip measuring the CPU matmul peak
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return generate_synthetic(tmp_path_factory.mktemp("data"), num_items=60, num_users=50, seed=0)


def make_config(workdir: Path, data: Path, **overrides):
  config = sft_configs.get_config("tiny")
  for key, value in {**SMALL, "workdir": str(workdir), "data.dir": str(data),
                     **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_config_tensorboard_and_checkpoints(tmp_path, data_dir):
  from recllm_jax.train.loop import train

  train(make_config(tmp_path, data_dir, **{"train.eval_every": 5, "train.eval_batches": 2}))
  rows = read_metrics(tmp_path)
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 11))
  for key in ("loss", "learning_rate", "tokens_per_sec", "mfu", "grad_norm"):
    assert all(key in r for r in steps), key
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


def test_cli_rejects_mistyped_keys_and_missing_weights(tmp_path):
  base = [sys.executable, str(REPO / "scripts" / "train.py"), "--config"]
  typo = subprocess.run(base + [str(REPO / "configs/sft.py:tiny"), "--config.train.num_stepz=3"],
                        capture_output=True, text=True, env=_env())
  assert typo.returncode != 0
  assert "num_stepz" in typo.stderr and 'Did you mean "num_steps"' in typo.stderr
  missing = subprocess.run(base + [str(REPO / "configs/sft.py"),
                                   f"--config.workdir={tmp_path}",
                                   "--config.model.hf_path=/nonexistent/r1"],
                           capture_output=True, text=True, env=_env())
  assert missing.returncode != 0
  assert "huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in missing.stderr
  assert "Traceback" not in missing.stderr


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
  from recllm_jax.data.tokenizer import train_bpe_tokenizer
  from recllm_jax.train.loop import train

  hf_dir, _ = hf_checkpoint(vocab_size=320)
  texts = [line for line in (data_dir / "catalog.jsonl").read_text().splitlines()]
  train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=320)
  config = make_config(tmp_path / "w", data_dir, **{
      "model.preset": "hf", "model.hf_path": str(hf_dir), "model.tokenizer_path":
      str(tmp_path / "tok"), "model.dtype": "bfloat16", "model.remat": True,
      "train.num_steps": 3})
  row = train(config)
  assert row["step"] == 3 and row["loss"] > 0
