"""Smoke run of benchmarks/accelerator.py on CPU (tiny sizes; the real run needs a GPU/TPU)."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark

SMOKE = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
         "--kv_heads", "2", "--vocab", "512", "--sft_len", "32", "--prompt_len", "16",
         "--new_tokens", "8", "--steps", "1"]


def _benchmark():
  return load_benchmark("accelerator")


def test_refuses_cpu_without_allow_cpu(capsys):
  with pytest.raises(SystemExit) as exit_info:
    _benchmark().main([*SMOKE, "--no_torch"])  # the torch import would only cost time here
  assert exit_info.value.code == 2
  assert "--allow_cpu" in capsys.readouterr().err


@pytest.mark.benchmark  # ~50 s on 2 busy cores: compiles 4 programs for 8 devices
def test_smoke_run_on_8_cpu_devices(capsys, tmp_path):
  results = _benchmark().main(["--allow_cpu", *SMOKE, "--json", str(tmp_path / "acc.json")])
  # 8 devices: 64 SFT rows of 32 tokens; 8 prompts x G=8 rows of 8 new tokens each.
  assert results["sft_tokens_per_s_per_device"] > 0 and 0 < results["sft_mfu"]
  assert results["rollout_new_tokens_per_s"] > 0 and results["grpo_step_s"] > 0
  assert results["plan_bytes"] == max(results["sft_plan_bytes"], results["grpo_plan_bytes"])
  last = capsys.readouterr().out.splitlines()[-2]  # then "wrote <json>"
  assert last.startswith("accelerator: cpu x8 sft ")
  assert json.loads((tmp_path / "acc.json").read_text())["sft_mfu"] == results["sft_mfu"]
  if _torch_importable():  # the torch anchor ran on the CPU, one device's share of the shapes
    assert " | torch sft x" in last
    assert results["torch_shapes"]["sft_rows"] == 8 and results["torch_shapes"]["prompts"] == 1
    assert results["ratio_sft"] > 0 and results["ratio_rollout"] > 0
    assert results["ratio_rollout_shared_prefill"] > 0


def _torch_importable() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def test_torch_anchor_on_cpu():
  """The anchor alone (tiny sizes): the transformers APIs it uses still exist (~1 s, plus the
  torch import when no earlier test made it)."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import torch

  bench = _benchmark()
  args = bench.parse_args(["--allow_cpu", *SMOKE, "--new_tokens", "4", "--generations", "2"])
  sft, grpo = bench.run_configs(args, 8)
  shapes = bench.torch_shapes(sft, grpo, 8)
  assert shapes == {"sft_rows": 8, "sft_len": 32, "grad_accum": 2, "prompts": 1,
                    "generations": 2, "prompt_len": 16, "new_tokens": 4}
  out = bench.bench_torch(args, bench.model_config(args), sft, grpo, shapes, torch, transformers,
                          "cpu")
  assert out["torch_sft_tokens_per_s_per_device"] > 0 and out["torch_remat"]
  assert out["torch_rollout_new_tokens_per_s"] > 0
  assert "torch_rollout_shared_error" not in out, out.get("torch_rollout_shared_error")
  assert out["torch_rollout_shared_new_tokens_per_s"] > 0
