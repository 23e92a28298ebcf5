"""SFT train-step throughput: our jitted JAX step vs a transformers/PyTorch step.

Both sides train the same `benchmark_model()` weights (fp32) on the same batch of 8 x 256
tokens, with AdamW and a completion-only loss; one step = forward + backward + optimizer
update. Prints tokens/s of both, their ratio, and MFU against the fp32 matmul FLOP/s measured
in this same run (see `recllm_jax.train.metrics` for the FLOPs formula).

  python benchmarks/sft_step.py [--batch 8] [--length 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from recllm_jax import sharding
from recllm_jax.models.qwen2_hf import load_hf_model
from recllm_jax.models.config import benchmark_model
from recllm_jax.train import metrics, optim
from recllm_jax.train.sft import sft_loss_fn

LR, WD = 1e-4, 0.01


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length rows; the second half of each row is the completion."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, length // 2:] = 1
  return {"input_ids": tokens[:, :-1], "attention_mask": np.ones((batch, length), np.int32),
          "targets": tokens[:, 1:], "loss_mask": loss_mask}


def timed(step, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def jax_step_fn(hf_dir: str, batch: dict[str, np.ndarray]):
  mesh = sharding.make_mesh()
  model = load_hf_model(hf_dir, mesh=mesh)
  schedule = optim.make_schedule(LR, num_steps=1000, warmup_steps=0, min_lr_ratio=1.0)
  opt = optim.make_optimizer(schedule, weight_decay=WD, max_grad_norm=0.0)
  graphdef, state = optim.init_train_state(model, opt, seed=0)
  step = optim.make_train_step(graphdef, opt, sft_loss_fn, schedule,
                               state_sharding=sharding.shardings_of(state))
  from recllm_jax.data.pipeline import to_global
  batch = to_global(batch, mesh)
  holder = {"state": state}

  def run():
    with jax.set_mesh(mesh):
      holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m)
    return float(m["loss"])

  return run


def torch_step_fn(torch_model, batch: dict[str, np.ndarray]):
  import torch

  opt = torch.optim.AdamW(torch_model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=WD)
  inputs = torch.from_numpy(batch["input_ids"]).long()
  attn = torch.from_numpy(batch["attention_mask"]).long()
  targets = torch.from_numpy(batch["targets"]).long()
  mask = torch.from_numpy(batch["loss_mask"])
  torch_model.train()

  def run():
    logits = torch_model(input_ids=inputs, attention_mask=attn).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()

  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  cfg = benchmark_model()
  hf_cfg = transformers.Qwen2Config(**{**cfg.to_hf_dict(), "torch_dtype": "float32"})
  torch.manual_seed(0)
  torch_model = transformers.Qwen2ForCausalLM(hf_cfg).float()
  batch = make_batch(args.batch, args.length, cfg.vocab_size)
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp, safe_serialization=True)
    jax_run = jax_step_fn(tmp, batch)
  torch_run = torch_step_fn(torch_model, batch)

  # Same weights, same batch: the first losses must agree.
  loss_jax, loss_torch = jax_run(), torch_run()
  for _ in range(args.warmup - 1):
    jax_run(), torch_run()
  # Interleave so that noise from other processes on the machine hits both sides alike; the
  # matmul peak is re-measured every round and its best value kept (a busy machine only ever
  # lowers it, which would inflate MFU).
  a = torch.ones(2048, 2048)
  t_jax, t_torch, peaks, torch_peaks = [], [], [], []
  for _ in range(args.steps):
    t_jax += timed(jax_run, 1)
    t_torch += timed(torch_run, 1)
    peaks.append(metrics.measure_matmul_flops(2048, repeats=3))
    torch_peaks.append(2 * 2048**3 / min(timed(lambda: a @ a, 3)))
  peak, torch_peak = max(peaks), max(torch_peaks)

  tokens = args.batch * args.length
  flops = metrics.flops_per_token(cfg, args.length) * tokens
  n_params = sum(p.numel() for p in torch_model.parameters())
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"torch threads {torch.get_num_threads()}")
  print(f"model: benchmark_model() {n_params / 1e6:.1f}M params, batch {args.batch} x "
        f"{args.length}, fp32, AdamW; {flops / tokens / 1e6:.1f} MFLOPs/token")
  print(f"first-step loss: jax {loss_jax:.5f}  torch {loss_torch:.5f}")
  print(f"measured fp32 2048^2 matmul: jax {peak / 1e9:.1f} GFLOP/s (MFU denominator), "
        f"torch {torch_peak / 1e9:.1f} GFLOP/s")
  results = {}
  for name, times in (("jax", t_jax), ("torch", t_torch)):
    best, median = min(times), statistics.median(times)
    results[name] = (tokens / best, tokens / median)
    print(f"{name:6s} step best {best * 1e3:7.1f} ms  {tokens / best:7.0f} tokens/s  "
          f"MFU {flops / best / peak:6.1%}   (median {median * 1e3:7.1f} ms, "
          f"{tokens / median:7.0f} tokens/s, of {len(times)} steps)")
  print(f"speedup jax/torch: {results['jax'][0] / results['torch'][0]:.2f}x (best step), "
        f"{results['jax'][1] / results['torch'][1]:.2f}x (median step)")


if __name__ == "__main__":
  main()
