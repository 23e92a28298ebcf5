"""Accelerator benchmark: the 1.5B architecture (random weights) on a GPU or TPU, in one run.

    python benchmarks/accelerator.py                       # ~3-5 minutes on one H100
    python benchmarks/accelerator.py --allow_cpu --layers 1 --hidden 64 --intermediate 128 \\
        --heads 4 --kv_heads 2 --vocab 512 --sft_len 32 --prompt_len 16 --new_tokens 8  # smoke

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture (`models.PRESETS`), randomly
initialised, with the paper configs' numerics (fp32 params, bf16 compute, remat; `--param_dtype
bfloat16` for bf16 params), sharded FSDP over all devices. Three measurements, each with the
train code's own jitted functions, after a warm-up call that compiles:

  sft       `optim.make_train_step` of `sft.sft_loss_fn` on `--sft_batch` x `--sft_len` tokens:
            tokens/s/device and MFU against the chip's datasheet bf16 peak
            (`train.metrics.peak_flops_per_device`, FLOPs per token `metrics.flops_per_token`);
  rollout   `decoding.generate` as `GrpoTask.rollout` runs it: `--prompts` x G=`--generations`
            samples of `--new_tokens` (no EOS stops a random model, so every row runs to the
            end) after `--prompt_len`-token prompts: new tokens/s;
  grpo step rollout + `grpo.training_rows` + the reference log-probs (`make_logprob_fn`, beta >
            0) + one update of `grpo.grpo_loss_fn` (mu = 1): seconds per step. Rewards and
            advantages are host work on decoded text (no tokenizer here): random advantages.

Memory: the planner's predicted peak per device (`recllm_jax.plan` for these exact settings)
beside XLA's compile-time estimate of the update step (`memory_analysis()`) and
`jax.devices()[0].memory_stats()['peak_bytes_in_use']` measured after the SFT part and after the
GRPO part (a running maximum, so the second compares with the larger of both plans).

On a CPU it refuses, unless `--allow_cpu` (then use tiny sizes, as above). The last line is

  accelerator: <device> x<n> sft <tok/s/dev> tok/s/dev MFU <x>% | rollout <tok/s> new tok/s |
  grpo step <s> s | peak <measured> GiB (plan <planned> GiB)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# JAX preallocates 75% of a GPU by default; the GRPO part plans ~50 GiB on one H100-80GB.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` and `benchmarks` import as in the scripts

GiB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--allow_cpu", action="store_true", help="run on CPU (smoke test sizes)")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the 1.5B's 28)")
  p.add_argument("--hidden", type=int, default=0)
  p.add_argument("--intermediate", type=int, default=0)
  p.add_argument("--heads", type=int, default=0)
  p.add_argument("--kv_heads", type=int, default=0)
  p.add_argument("--vocab", type=int, default=0)
  p.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--no_remat", action="store_true")
  p.add_argument("--sft_batch", type=int, default=0, help="sequences (0: 8 per device)")
  p.add_argument("--sft_len", type=int, default=1024)
  p.add_argument("--prompts", type=int, default=0, help="P prompts (0: 8, or 1 per device "
                 "when more devices)")
  p.add_argument("--generations", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--grad_accum", type=int, default=2, help="train.grad_accum_steps (both)")
  p.add_argument("--steps", type=int, default=3, help="timed calls of each part")
  return p.parse_args(argv)


def model_config(args: argparse.Namespace):
  from recllm_jax.models import PRESETS
  from recllm_jax.plan import HF_PRESET

  sizes = {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
           "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
           "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab}
  return PRESETS[HF_PRESET](param_dtype=args.param_dtype, dtype="bfloat16",
                            remat=not args.no_remat, **{k: v for k, v in sizes.items() if v})


def run_configs(args: argparse.Namespace, num_devices: int):
  """The paper SFT and GRPO configs with the benchmark's batch settings (what `plan` reads)."""
  from configs.grpo import get_config as grpo_config
  from configs.sft import get_config as sft_config

  sft, grpo = sft_config(), grpo_config()
  with sft.unlocked(), grpo.unlocked():
    for c in (sft, grpo):
      c.model.param_dtype, c.model.remat = args.param_dtype, not args.no_remat
      c.train.grad_accum_steps = args.grad_accum
      c.mesh.fsdp = -1
    sft.train.batch_size = args.sft_batch or 8 * num_devices
    sft.data.max_length = args.sft_len
    grpo.train.batch_size = args.prompts or max(8, num_devices)
    grpo.grpo.num_generations = args.generations
    grpo.grpo.max_new_tokens = args.new_tokens
    grpo.data.max_length = args.prompt_len
  return sft, grpo


def timed(fn, steps: int) -> list[float]:
  """Wall seconds of `steps` calls of `fn` (which must block until its results are ready)."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def peak_bytes() -> int | None:
  stats = __import__("jax").devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def train_setup(config, cfg, mesh, loss_fn):
  """(graphdef, state, jitted step) for `config` built as `train.loop.train` does."""
  from flax import nnx

  from recllm_jax import plan, sharding
  from recllm_jax.models import Qwen2ForCausalLM
  from recllm_jax.train import optim

  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  optimizer = plan.make_optimizer(config)
  graphdef, state = optim.init_train_state(model, optimizer, seed=0)
  del model
  schedule = lambda step: config.train.lr
  step = optim.make_train_step(graphdef, optimizer, loss_fn, schedule,
                               config.train.grad_accum_steps, sharding.shardings_of(state))
  return graphdef, state, step


def compiled(step, *args):
  """The AOT-compiled `step` for `args` and XLA's per-device memory estimate (bytes)."""
  exe = step.lower(*args).compile()
  m = exe.memory_analysis()
  estimate = None if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes
                                     - m.alias_size_in_bytes + m.temp_size_in_bytes)
  return exe, estimate


def bench_sft(args, config, cfg, mesh) -> dict[str, Any]:
  import jax

  from benchmarks.sft_step import make_batch
  from recllm_jax.data.pipeline import to_global
  from recllm_jax.train import metrics
  from recllm_jax.train.sft import sft_loss_fn

  loss_fn = functools.partial(sft_loss_fn, logits_chunk_size=config.train.logits_chunk_size)
  _, state, step = train_setup(config, cfg, mesh, loss_fn)
  batch = to_global(make_batch(config.train.batch_size, config.data.max_length, cfg.vocab_size),
                    mesh)
  holder = {"state": state}
  with jax.set_mesh(mesh):
    exe, estimate = compiled(step, state, batch)

    def run():
      holder["state"], m = exe(holder["state"], batch)
      jax.block_until_ready(m)

    run()  # warm-up
    times = timed(run, args.steps)
  tokens = config.train.batch_size * config.data.max_length
  best = min(times)
  peak, _ = metrics.peak_flops_per_device()
  flops = metrics.flops_per_token(cfg, config.data.max_length) * tokens
  return {"sft_step_s": statistics.median(times),
          "sft_tokens_per_s_per_device": tokens / best / jax.device_count(),
          "sft_mfu": flops / best / (peak * jax.device_count()), "sft_xla_bytes": estimate}


def bench_grpo(args, config, cfg, mesh) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from recllm_jax import decoding
  from recllm_jax.data.pipeline import to_global
  from recllm_jax.train import grpo

  gc = config.grpo
  p, g, m = config.train.batch_size, gc.num_generations, gc.max_new_tokens
  loss_fn = functools.partial(grpo.grpo_loss_fn, gc=gc,
                              logits_chunk_size=config.train.logits_chunk_size)
  graphdef, state, update = train_setup(config, cfg, mesh, loss_fn)
  ref_params = jax.tree.map(jnp.copy, state.params)  # GrpoTask.setup's frozen reference
  logprob_fn = grpo.make_logprob_fn(graphdef, temperature=gc.temperature,
                                    logits_chunk_size=config.train.logits_chunk_size)
  rng = np.random.default_rng(0)
  prompt_len = config.data.max_length
  ids = rng.integers(3, cfg.vocab_size, (p, prompt_len)).astype(np.int32)
  mask = np.ones((p, prompt_len), np.int32)
  holder = {"state": state, "xla": None}

  def rollout():
    model = nnx.merge(graphdef, holder["state"].params)
    with jax.set_mesh(mesh):
      out = decoding.generate(model, ids, mask, max_new_tokens=m, rng=jax.random.key(0),
                              temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p,
                              eos_token_id=None, num_samples=g)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # waits for the device
    return grpo.Rollout(tokens=tokens, lengths=lengths, truncated=lengths >= m)

  def step():
    r = rollout()
    rows = grpo.training_rows(ids, mask, r, g)
    rows["advantages"] = rng.standard_normal(p * g).astype(np.float32)
    rows = to_global(rows, mesh)
    with jax.set_mesh(mesh):
      rows["ref_logp"] = logprob_fn(ref_params, rows)
      if holder["xla"] is None:
        exe, holder["xla"] = compiled(update, holder["state"], rows)
        holder["update"] = exe
      holder["state"], metrics = holder["update"](holder["state"], rows)
      jax.block_until_ready(metrics)

  rollout()  # compiles the decoder
  rollout_times = timed(rollout, args.steps)
  step()  # compiles the log-prob forward and the update
  step_times = timed(step, args.steps)
  return {"rollout_s": statistics.median(rollout_times),
          "rollout_new_tokens_per_s": p * g * m / min(rollout_times),
          "grpo_step_s": statistics.median(step_times), "grpo_update_xla_bytes": holder["xla"]}


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / GiB:.3g} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import jax

  from recllm_jax import plan, sharding

  device = jax.devices()[0]
  if device.platform == "cpu" and not args.allow_cpu:
    print("benchmarks/accelerator.py measures a GPU or TPU, and this machine has only CPUs; "
          "pass --allow_cpu with small sizes (--layers 1 --hidden 64 ...) for a smoke run.",
          file=sys.stderr)
    raise SystemExit(2)
  n = jax.device_count()
  cfg = model_config(args)
  sft_cfg, grpo_cfg = run_configs(args, n)
  mesh = sharding.make_mesh(1, -1, 1)
  plans = {"sft": plan.plan(sft_cfg, n, model_cfg=cfg), "grpo": plan.plan(grpo_cfg, n, model_cfg=cfg)}
  print(f"device: {device.device_kind} x{n} ({device.platform}), jax {jax.__version__}")
  print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}, params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}")

  results = bench_sft(args, sft_cfg, cfg, mesh)
  results["sft_peak_bytes"] = peak_bytes()
  results.update(bench_grpo(args, grpo_cfg, cfg, mesh))
  results["peak_bytes"] = peak_bytes()
  planned = max(p.peak for p in plans.values())
  results.update(sft_plan_bytes=plans["sft"].peak, grpo_plan_bytes=plans["grpo"].peak,
                 plan_bytes=planned)

  sc, gcfg = sft_cfg.train, grpo_cfg
  print(f"sft: {sc.batch_size} x {sft_cfg.data.max_length} tokens, step "
        f"{results['sft_step_s']:.3f} s, {results['sft_tokens_per_s_per_device']:.0f} "
        f"tokens/s/device, MFU {results['sft_mfu']:.1%}")
  print(f"rollout: {gcfg.train.batch_size} prompts x G={gcfg.grpo.num_generations}, "
        f"{gcfg.data.max_length}-token prompts, {gcfg.grpo.max_new_tokens} new tokens: "
        f"{results['rollout_s']:.2f} s, {results['rollout_new_tokens_per_s']:.0f} new tokens/s")
  print(f"grpo step (rollout + ref log-probs + update): {results['grpo_step_s']:.2f} s")
  print(f"memory per device: after SFT peak {_gib(results['sft_peak_bytes'])} (plan "
        f"{_gib(plans['sft'].peak)}, XLA estimate of the step {_gib(results['sft_xla_bytes'])}); "
        f"after GRPO peak {_gib(results['peak_bytes'])} (plan max(SFT, GRPO) {_gib(planned)}: "
        f"GRPO rollout {_gib(plans['grpo'].rollout_peak)}, update {_gib(plans['grpo'].update_peak)}"
        f"; XLA estimate of the update {_gib(results['grpo_update_xla_bytes'])})")
  print(f"accelerator: {device.device_kind} x{n} sft "
        f"{results['sft_tokens_per_s_per_device']:.0f} tok/s/dev MFU {results['sft_mfu']:.1%} | "
        f"rollout {results['rollout_new_tokens_per_s']:.0f} new tok/s | grpo step "
        f"{results['grpo_step_s']:.2f} s | peak {_gib(results['peak_bytes'])} "
        f"(plan {_gib(planned)})")
  return results


if __name__ == "__main__":
  main()
