"""Smoke run of benchmarks/accelerator.py on CPU (tiny sizes; the real run needs a GPU/TPU)."""

from __future__ import annotations


import pytest
from benchmark_scripts import load_benchmark

SMOKE = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
         "--kv_heads", "2", "--vocab", "512", "--sft_len", "32", "--prompt_len", "16",
         "--new_tokens", "8", "--steps", "1"]


def _benchmark():
  return load_benchmark("accelerator")


def test_refuses_cpu_without_allow_cpu(capsys):
  with pytest.raises(SystemExit) as exit_info:
    _benchmark().main(SMOKE)
  assert exit_info.value.code == 2
  assert "--allow_cpu" in capsys.readouterr().err


@pytest.mark.benchmark  # ~50 s on 2 busy cores: compiles 4 programs for 8 devices
def test_smoke_run_on_8_cpu_devices(capsys):
  results = _benchmark().main(["--allow_cpu", *SMOKE])
  # 8 devices: 64 SFT rows of 32 tokens; 8 prompts x G=8 rows of 8 new tokens each.
  assert results["sft_tokens_per_s_per_device"] > 0 and 0 < results["sft_mfu"]
  assert results["rollout_new_tokens_per_s"] > 0 and results["grpo_step_s"] > 0
  assert results["plan_bytes"] == max(results["sft_plan_bytes"], results["grpo_plan_bytes"])
  assert capsys.readouterr().out.splitlines()[-1].startswith("accelerator: cpu x8 sft ")
