"""Multi-host training on localhost: 2 processes x 4 CPU devices match 1 process x 8 devices.

`scripts/train.py` runs as real separate processes joined by `jax.distributed` (gloo CPU
collectives) on 127.0.0.1, exactly as on a pod: each process reads only its rows of every
global batch, so losses, rewards and every other logged metric must equal the single-process
run's. Also: the 2-process SFT run is resumed from its own checkpoint (Orbax state and the
per-process Grain iterator states) half-way, GRPO starts from it, its checkpoint restores in a
single process, and SIGTERM stops a run with exit status 0 and a checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]
# configs/grpo.py:tiny with a reward that varies on untrained completions (non-zero advantages).
GRPO_CONFIG = str(Path(__file__).with_name("multiprocess_grpo.py")) + ":tiny"
DEVICES = 8  # in all: 1 x 8 or 2 x 4

# Terse prompts and a 1-layer model: each run is start-up plus a few fast steps.
PROMPT = {"data.prompt.user_template": "{history}{instruction}", "data.prompt.instruction": "Next:",
          "data.prompt.history_header": "", "data.prompt.history_attributes": (),
          "data.prompt.max_history_tokens": 40, "data.max_length": 64, "data.num_buckets": 2,
          "data.prefetch_threads": 0, "train.peak_flops": 1e12, "train.log_every": 1}
SFT = {**PROMPT, "model.hidden_size": 32, "model.intermediate_size": 64,
       "model.num_hidden_layers": 1, "model.num_attention_heads": 4,
       "model.num_key_value_heads": 2, "model.tokenizer_vocab_size": 320,
       "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 1, "train.num_steps": 4,
       "train.eval_every": 4, "train.eval_batches": 2, "train.checkpoint_every": 0}
# 2 prompts x G=4 = 8 rows: one prompt per process, so each group lives on one process.
GRPO = {**PROMPT, "grpo.num_generations": 4, "train.batch_size": 2, "grpo.max_new_tokens": 12,
        "train.num_steps": 2, "train.eval_every": 2, "grpo.eval_prompts": 4,
        "train.checkpoint_every": 0,
        "grpo.samples_every": 1, "grpo.beta": 0.04, "grpo.num_iterations": 2, "train.lr": 1e-3}
# Wall-clock and host metrics (memory, compile counts) differ between any two runs; everything
# else must match.
TIMING = ("tokens_per_sec", "mfu", "time_", "host_rss_mb", "xla_compiles")
TOLERANCE = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def command(config: str, workdir: Path, settings: dict, **overrides) -> list[str]:
  args = {**settings, "workdir": str(workdir), **overrides}
  return [*TRAIN, "--config", str(REPO / "configs" / config) if "/" not in config else config,
          *(f"--config.{k}={v}" for k, v in args.items())]


def run(config: str, workdir: Path, settings: dict, processes: int, **overrides) -> None:
  """`scripts/train.py` as `processes` processes sharing DEVICES CPU devices; all must exit 0."""
  base = command(config, workdir, settings, **overrides)
  if processes > 1:
    address = f"127.0.0.1:{free_port()}"
    cmds = [base + [f"--config.distributed.coordinator_address={address}",
                    f"--config.distributed.num_processes={processes}",
                    f"--config.distributed.process_id={i}"] for i in range(processes)]
  else:
    cmds = [base]
  logs = [workdir.parent / f"{workdir.name}.{i}.log" for i in range(processes)]
  procs = [subprocess.Popen(cmd, env=env_for(DEVICES // processes), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w")) for cmd, log in zip(cmds, logs)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    assert code == 0, log.read_text()[-3000:]


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: list[dict], b: list[dict]) -> tuple[float, str]:
  """The largest |a - b| over every non-timing metric of every row, and where it is."""
  assert [r["step"] for r in a] == [r["step"] for r in b]
  worst, where = 0.0, ""
  for ra, rb in zip(a, b):
    keys = {k for k in ra if not k.startswith(TIMING)}
    assert keys == {k for k in rb if not k.startswith(TIMING)}, (ra, rb)
    for k in keys:
      d = abs(float(ra[k]) - float(rb[k]))
      if d >= worst:
        worst, where = d, f"step {ra['step']} {k}: {ra[k]} vs {rb[k]}"
  return worst, where


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return generate_synthetic(tmp_path_factory.mktemp("data"), num_items=60, num_users=60, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
  """SFT then GRPO, once in 1 process x 8 devices and once in 2 processes x 4 devices."""
  root = tmp_path_factory.mktemp("runs")
  data = {"data.dir": str(data_dir)}
  out = {}
  for processes in (1, 2):
    sft, grpo = root / f"sft{processes}", root / f"grpo{processes}"
    if processes == 2:  # stopped half-way and resumed: the restore must be exact too
      run("sft.py:tiny", sft, {**SFT, **data}, processes,
          **{"train.num_steps": 2, "train.eval_every": 0})
    run("sft.py:tiny", sft, {**SFT, **data}, processes)
    run(GRPO_CONFIG, grpo, {**GRPO, **data}, processes, init_from=str(sft))
    out[f"sft{processes}"], out[f"grpo{processes}"] = sft, grpo
  return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "grpo"])
def test_two_processes_match_one(runs, task):
  one, two = read_metrics(runs[f"{task}1"]), read_metrics(runs[f"{task}2"])
  key = "loss" if task == "sft" else "reward"
  train_rows = [r for r in one if not any(k.startswith("val_") for k in r)]
  assert len(train_rows) >= 2 and all(key in r for r in train_rows)
  assert any(k.startswith("val_") for r in one for k in r)  # held-out evaluation compared too
  worst, where = max_diff(one, two)
  print(f"{task}: max |1-process - 2-process| = {worst:.3g} ({where})")
  assert worst <= TOLERANCE, where
  if task == "grpo":  # advantages are not all 0, so the updates really are compared
    assert all(r["frac_zero_std"] < 1 and r["grad_norm"] > 0 for r in train_rows)


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
  import jax

  from recllm_jax.train.build import load_checkpoint

  params = [jax.tree.leaves(jax.device_get(load_checkpoint(runs[name])[0]))
            for name in ("sft1", "sft2")]
  assert len(params[0]) == len(params[1])
  for a, b in zip(*params):
    np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_dir):
  workdir = tmp_path / "w"
  cmd = command("sft.py:tiny", workdir, {**SFT, "data.dir": str(data_dir)},
                **{"train.num_steps": 100000, "train.eval_every": 0})
  proc = subprocess.Popen(cmd, env=env_for(2), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  stopped = read_metrics(workdir)[-1]["step"]
  assert os.listdir(workdir / "checkpoints") == [str(stopped)]
  # The same command with a reachable end resumes after the saved step.
  subprocess.run(command("sft.py:tiny", workdir, {**SFT, "data.dir": str(data_dir)},
                         **{"train.num_steps": stopped + 2, "train.eval_every": 0}),
                 env=env_for(2), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert [r["step"] for r in read_metrics(workdir)] == list(range(1, stopped + 3))
  assert sorted(os.listdir(workdir / "checkpoints"), key=int)[-1] == str(stopped + 2)
