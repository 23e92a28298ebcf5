"""Accelerator benchmark: the 1.5B architecture (random weights) on a GPU or TPU, in one run,
beside a PyTorch/transformers anchor on the same shapes.

    python benchmarks/accelerator.py --json accelerator.json   # one GPU: the torch anchor ~35 s
    python benchmarks/accelerator.py --allow_cpu --layers 1 --hidden 64 --intermediate 128 \\
        --heads 4 --kv_heads 2 --vocab 512 --sft_len 32 --prompt_len 16 --new_tokens 8  # smoke

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture (`models.PRESETS`), randomly
initialised on the host (`random_model`: `sharding.create_sharded`'s jitted init compiled for 6
minutes on an H200), with the paper configs' numerics (fp32 params, bf16 compute, remat;
`--param_dtype bfloat16` for bf16 params), sharded FSDP over all devices. Three measurements,
each with the train code's own jitted functions, after a warm-up call that compiles:

  sft       `optim.make_train_step` of `sft.sft_loss_fn` on `--sft_batch` x `--sft_len` tokens:
            tokens/s/device and MFU against the chip's datasheet bf16 peak
            (`train.metrics.peak_flops_per_device`, FLOPs per token `metrics.flops_per_token`);
  rollout   `decoding.generate` as `GrpoTask.rollout` runs it: `--prompts` x G=`--generations`
            samples of `--new_tokens` (no EOS stops a random model, so every row runs to the
            end) after `--prompt_len`-token prompts: new tokens/s. Each prompt is prefilled
            once and its cache is the shared read-only prefix of its G rows;
  grpo step rollout + `grpo.training_rows` + the reference log-probs (`make_logprob_fn`, beta >
            0) + one update of `grpo.grpo_loss_fn` (mu = 1): seconds per step. Rewards and
            advantages are host work on decoded text (no tokenizer here): random advantages.

Torch anchor (skipped by `--no_torch`, or with a printed note when torch/transformers is missing
or torch sees no CUDA device while JAX runs on an accelerator): `transformers.Qwen2ForCausalLM`
built from the same sizes (`Qwen2Config.to_hf_dict`, random init, SDPA attention) on one device
(cuda:0, or the CPU in a smoke run), with each device's share of the same shapes:

  sft       fp32 params, `torch.autocast(bf16)`, `gradient_checkpointing_enable()` when ours
            remats, AdamW (fused on CUDA) with the config's lr/betas/weight decay and gradient
            clipping, the same `--grad_accum` micro-batches per optimizer step, labels =
            input_ids; the same warm-up and `--steps` timed steps: tokens/s/device, MFU with
            the same FLOPs formula and peak, and ours/torch;
  rollout   the same model cast to bf16 (eval), `model.generate(do_sample=True,
            num_return_sequences=G, max_new_tokens=min_new_tokens=--new_tokens)` with the config's
            temperature/top-k/top-p, a dynamic KV cache (`--torch_cache static` to try the static
            one): new tokens/s. Unequal work: `num_return_sequences` expands the prompts before
            the prefill, so torch prefills P*G prompts where ours prefills P. Hence a second
            variant at equal prefill work ("shared prefill"): the P prompts (less their last
            token) prefilled once, the cache copied G times (`DynamicCache.
            batch_repeat_interleave`), then `generate` of the P*G rows from it. What still differs:
            torch decodes against G copies of each prompt's keys/values, ours reads one shared
            copy. Torch rollouts are timed `--torch_rollout_steps` times after a 2-token warm-up.

Torch runs first on a GPU, before JAX starts and preallocates (`XLA_PYTHON_CLIENT_MEM_FRACTION`,
0.95 here), and frees its memory (`del`, `torch.cuda.empty_cache()`) before JAX starts: only
torch's CUDA context (under 1 GiB) stays, and JAX's `peak_bytes_in_use` counts JAX's own
allocator only, so the memory comparison below is unchanged by the anchor.

Memory: the planner's predicted peak per device (`recllm_jax.plan` for these exact settings)
beside XLA's compile-time estimate of the update step (`memory_analysis()`) and
`jax.devices()[0].memory_stats()['peak_bytes_in_use']` measured after the SFT part and after the
GRPO part (a running maximum, so the second compares with the larger of both plans).

On a CPU it refuses, unless `--allow_cpu` (then use tiny sizes, as above). `--json PATH` writes
every number (both sides, shapes, versions) to PATH. The last line is

  accelerator: <device> x<n> sft <tok/s/dev> tok/s/dev MFU <x>% | rollout <tok/s> new tok/s |
  grpo step <s> s | peak <measured> GiB (plan <planned> GiB) | torch sft x<ours/torch>
  rollout x<ours/torch> (x<ours/torch shared prefill> shared prefill)

(the torch part only when the anchor ran; ratios per device).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
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
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"],
                 help="model.attention (auto: cuDNN on a GPU, splash on a TPU, einsum on CPU)")
  p.add_argument("--sft_batch", type=int, default=0, help="sequences (0: 8 per device)")
  p.add_argument("--sft_len", type=int, default=1024)
  p.add_argument("--prompts", type=int, default=0, help="P prompts (0: 8, or 1 per device "
                 "when more devices)")
  p.add_argument("--generations", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--grad_accum", type=int, default=2, help="train.grad_accum_steps (both)")
  p.add_argument("--steps", type=int, default=3, help="timed calls of each part")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch/transformers anchor")
  p.add_argument("--torch_rollout_steps", type=int, default=1,
                 help="timed torch generate calls of each variant (each runs all new tokens)")
  p.add_argument("--torch_cache", default="dynamic", choices=["dynamic", "static"],
                 help="KV cache of the torch generate (`cache_implementation`)")
  p.add_argument("--json", default="", help="also write every number to this JSON file")
  return p.parse_args(argv)


def model_config(args: argparse.Namespace):
  from recllm_jax.models import PRESETS
  from recllm_jax.plan import HF_PRESET

  sizes = {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
           "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
           "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab}
  return PRESETS[HF_PRESET](param_dtype=args.param_dtype, dtype="bfloat16",
                            remat=not args.no_remat, attention=args.attention,
                            **{k: v for k, v in sizes.items() if v})


def run_configs(args: argparse.Namespace, num_devices: int):
  """The paper SFT and GRPO configs with the benchmark's batch settings (what `plan` reads)."""
  from configs.grpo import get_config as grpo_config
  from configs.sft import get_config as sft_config

  sft, grpo = sft_config(), grpo_config()
  with sft.unlocked(), grpo.unlocked():
    for c in (sft, grpo):
      c.model.param_dtype, c.model.remat = args.param_dtype, not args.no_remat
      c.model.attention = args.attention  # the planner's score rows follow the kernel
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


_DRAWS: dict[Any, Any] = {}  # (shape, dtype) -> the host draw, shared by the SFT and GRPO parts


def random_model(cfg, mesh):
  """The model with random weights made on the host and put straight into their FSDP layout.

  Not `sharding.create_sharded`: its one jitted random init of the whole 1.5B model compiled
  for 6 minutes on an H200 (jax 0.11.2; 1.5 s on a CPU). Here: normal(0, initializer_range)
  matrices (one draw per distinct shape, shared by the layers: the timings do not depend on
  the values), RMSNorm scales 1, biases 0; each array `device_put` into its sharding.
  """
  import jax
  import numpy as np
  from flax import nnx

  from recllm_jax import sharding
  from recllm_jax.models import Qwen2ForCausalLM

  abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.logical_shardings(abstract_state, mesh)
  rng, draws = np.random.default_rng(0), _DRAWS

  def make(path, x, target):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      host = np.ones(x.shape, x.dtype)
    elif "bias" in name:
      host = np.zeros(x.shape, x.dtype)
    else:
      key = (x.shape, np.dtype(x.dtype))
      if key not in draws:
        draws[key] = (rng.standard_normal(x.shape, np.float32)
                      * np.float32(cfg.initializer_range)).astype(x.dtype, copy=False)
      host = draws[key]
    return jax.device_put(host, target)

  state = jax.tree_util.tree_map_with_path(make, abstract_state, shardings)
  return nnx.merge(graphdef, state)


def train_setup(config, cfg, mesh, loss_fn):
  """(graphdef, state, jitted step) for `config` built as `train.loop.train` does (but for the
  random init, `random_model`)."""
  from recllm_jax import plan, sharding
  from recllm_jax.train import optim

  model = random_model(cfg, mesh)
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


# ----------------------------------------------------------------------------------------------
# The PyTorch/transformers anchor
# ----------------------------------------------------------------------------------------------


def import_torch() -> tuple[Any, Any, str | None]:
  """(torch, transformers, None), or (None, None, why the anchor is skipped)."""
  try:
    import torch
    import transformers
    transformers.Qwen2ForCausalLM  # noqa: B018  (a lazy import: fails here if unavailable)
  except Exception as e:  # noqa: BLE001  (ImportError, or a broken install: skip the anchor)
    return None, None, f"torch anchor skipped: torch/transformers not importable ({e})"
  return torch, transformers, None


def torch_shapes(sft_config, grpo_config, num_devices: int) -> dict[str, int]:
  """One device's share of the benchmark's shapes (what the torch anchor runs on one device)."""
  sft_rows = sft_config.train.batch_size // num_devices
  accum = sft_config.train.grad_accum_steps
  if sft_rows < accum or sft_rows % accum:
    raise ValueError(f"torch anchor: {sft_rows} SFT rows per device do not split into "
                     f"grad_accum={accum} micro-batches")
  return {"sft_rows": sft_rows, "sft_len": sft_config.data.max_length, "grad_accum": accum,
          "prompts": max(1, grpo_config.train.batch_size // num_devices),
          "generations": grpo_config.grpo.num_generations,
          "prompt_len": grpo_config.data.max_length,
          "new_tokens": grpo_config.grpo.max_new_tokens}


def bench_torch(args, cfg, sft_config, grpo_config, shapes: dict[str, int], torch, transformers,
                device: str) -> dict[str, Any]:
  """SFT steps and rollouts of `transformers.Qwen2ForCausalLM` on `device` ("cuda" or "cpu")."""
  import gc

  cuda = device == "cuda"

  def sync():
    if cuda:
      torch.cuda.synchronize()

  hf = cfg.to_hf_dict()
  hf.pop("torch_dtype", None)
  if hf.get("eos_token_id") is not None and hf["eos_token_id"] >= cfg.vocab_size:
    hf["eos_token_id"] = None  # the smoke sizes' vocab is smaller than the preset's ids
  if hf.get("bos_token_id") is not None and hf["bos_token_id"] >= cfg.vocab_size:
    hf["bos_token_id"] = None
  hf_cfg = transformers.Qwen2Config(**hf, attn_implementation="sdpa")
  torch.manual_seed(0)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM(hf_cfg)  # fp32 params, random init
  model.train()
  # transformers >= 5.x names it activation_checkpointing_*; gradient_checkpointing_* before.
  remat_on = getattr(model, "activation_checkpointing_enable", None) or \
      model.gradient_checkpointing_enable
  remat_off = getattr(model, "activation_checkpointing_disable", None) or \
      model.gradient_checkpointing_disable
  if cfg.remat:
    remat_on({"use_reentrant": False})  # the checkpoint kwargs (first argument of both)
  out: dict[str, Any] = {"torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
                         "torch_version": torch.__version__,
                         "transformers_version": transformers.__version__,
                         "torch_remat": bool(cfg.remat)}

  # --- SFT: the same batch x length and grad accumulation; fp32 params, bf16 autocast.
  tc = sft_config.train
  rows, length, accum = shapes["sft_rows"], shapes["sft_len"], shapes["grad_accum"]
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.b1, tc.b2), weight_decay=tc.weight_decay,
                          **({"fused": True} if cuda else {}))
  gen = torch.Generator().manual_seed(0)
  ids = torch.randint(3, cfg.vocab_size, (rows, length), generator=gen).to(device)
  micro = ids.split(rows // accum)

  def sft_step():
    for mb in micro:
      with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=mb, labels=mb, use_cache=False).loss / accum
      loss.backward()
    if tc.max_grad_norm:
      torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()

  sft_step()  # warm-up
  times = timed(sft_step, args.steps)
  out.update(torch_sft_step_s=statistics.median(times),
             torch_sft_tokens_per_s_per_device=rows * length / min(times),
             torch_sft_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
  print(f"torch sft: {rows} x {length} tokens, {out['torch_sft_tokens_per_s_per_device']:.0f} "
        f"tokens/s ({args.steps} steps)", flush=True)
  opt = params = micro = None  # frees the optimizer state and gradients' owners
  model.zero_grad(set_to_none=True)
  gc.collect()

  # --- Rollout: the same model in bf16 (eval), sampling with the GRPO config's settings.
  gc_ = grpo_config.grpo
  remat_off()
  model = model.to(torch.bfloat16).eval()
  if cuda:
    torch.cuda.empty_cache()
  p, g, plen, m = shapes["prompts"], shapes["generations"], shapes["prompt_len"], \
      shapes["new_tokens"]
  prompts = torch.randint(3, cfg.vocab_size, (p, plen), generator=gen).to(device)
  sample = {"do_sample": True, "temperature": gc_.temperature, "top_k": gc_.top_k,
            "top_p": gc_.top_p, "pad_token_id": 0}
  out.update(torch_rollout_cache=args.torch_cache)

  def generate(new_tokens: int):
    kw = {"cache_implementation": "static"} if args.torch_cache == "static" else {}
    with torch.no_grad():
      res = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                           num_return_sequences=g, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **sample, **kw)
    sync()
    assert res.shape == (p * g, plen + new_tokens), res.shape

  def generate_shared(new_tokens: int):
    """Equal prefill work: P prompts prefilled once, their cache repeated G times."""
    rep = prompts.repeat_interleave(g, dim=0)
    with torch.no_grad(), warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # `past_key_values` -> `cache` in 5.x
      cache = model(input_ids=prompts[:, :-1], use_cache=True).past_key_values
      cache.batch_repeat_interleave(g)
      res = model.generate(input_ids=rep, attention_mask=torch.ones_like(rep),
                           past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **sample)
    sync()
    assert res.shape == (p * g, plen + new_tokens), res.shape

  steps = max(1, args.torch_rollout_steps)
  generate(2)  # warm-up (kernels, allocator)
  times = timed(lambda: generate(m), steps)
  out.update(torch_rollout_s=statistics.median(times),
             torch_rollout_new_tokens_per_s=p * g * m / min(times))
  print(f"torch rollout (generate, num_return_sequences={g}): "
        f"{out['torch_rollout_new_tokens_per_s']:.0f} new tokens/s", flush=True)
  try:
    generate_shared(2)
    times = timed(lambda: generate_shared(m), steps)
    out.update(torch_rollout_shared_s=statistics.median(times),
               torch_rollout_shared_new_tokens_per_s=p * g * m / min(times))
    print(f"torch rollout (shared prefill): "
          f"{out['torch_rollout_shared_new_tokens_per_s']:.0f} new tokens/s", flush=True)
  except Exception as e:  # noqa: BLE001  (a transformers version without this cache API)
    out.update(torch_rollout_shared_s=None, torch_rollout_shared_new_tokens_per_s=None,
               torch_rollout_shared_error=f"{type(e).__name__}: {e}")
    print(f"torch rollout (shared prefill) failed: {out['torch_rollout_shared_error']}",
          flush=True)
  out["torch_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
  model = prompts = ids = None
  gc.collect()
  if cuda:
    torch.cuda.empty_cache()
    out["torch_reserved_after_bytes"] = torch.cuda.memory_reserved()
  return out


def _ratio(ours: float | None, theirs: float | None) -> float | None:
  return None if not ours or not theirs else ours / theirs


def _x(r: float | None) -> str:
  return "n/a" if r is None else f"x{r:.2f}"


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / GiB:.3g} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import jax

  from recllm_jax import plan, sharding

  cfg = model_config(args)
  torch = transformers = None
  torch_note, torch_results, torch_n = None, None, 0
  if not args.no_torch:
    torch, transformers, torch_note = import_torch()
  if torch is not None and torch.cuda.is_available():
    # Before JAX starts: JAX preallocates most of the GPU when its backend starts.
    torch_n = torch.cuda.device_count()
    shapes = torch_shapes(*run_configs(args, torch_n), torch_n)
    print(f"torch anchor first, on cuda:0 (torch {torch.__version__}, transformers "
          f"{transformers.__version__}), before JAX takes the GPU", flush=True)
    torch_results = bench_torch(args, cfg, *run_configs(args, torch_n), shapes, torch,
                                transformers, "cuda")

  device = jax.devices()[0]
  if device.platform == "cpu" and not args.allow_cpu:
    print("benchmarks/accelerator.py measures a GPU or TPU, and this machine has only CPUs; "
          "pass --allow_cpu with small sizes (--layers 1 --hidden 64 ...) for a smoke run.",
          file=sys.stderr)
    raise SystemExit(2)
  n = jax.device_count()
  sft_cfg, grpo_cfg = run_configs(args, n)
  if torch is not None and torch_results is None:
    if device.platform == "cpu":
      torch_n = n
      shapes = torch_shapes(sft_cfg, grpo_cfg, n)
      print("torch anchor on the CPU (smoke run)", flush=True)
      torch_results = bench_torch(args, cfg, sft_cfg, grpo_cfg, shapes, torch, transformers,
                                  "cpu")
    else:
      torch_note = (f"torch anchor skipped: torch sees no CUDA device, JAX runs on "
                    f"{device.platform}")
  if torch_note:
    print(torch_note, flush=True)
  mesh = sharding.make_mesh(1, -1, 1)
  plans = {"sft": plan.plan(sft_cfg, n, model_cfg=cfg), "grpo": plan.plan(grpo_cfg, n, model_cfg=cfg)}
  print(f"device: {device.device_kind} x{n} ({device.platform}), jax {jax.__version__}")
  print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}, params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}, "
        f"attention {cfg.attention}", flush=True)

  results = bench_sft(args, sft_cfg, cfg, mesh)
  results["sft_peak_bytes"] = peak_bytes()
  print(f"jax sft done: {results['sft_tokens_per_s_per_device']:.0f} tokens/s/device",
        flush=True)
  results.update(bench_grpo(args, grpo_cfg, cfg, mesh))
  results["peak_bytes"] = peak_bytes()
  planned = max(p.peak for p in plans.values())
  results.update(sft_plan_bytes=plans["sft"].peak, grpo_plan_bytes=plans["grpo"].peak,
                 plan_bytes=planned)

  sc, gcfg = sft_cfg.train, grpo_cfg
  p, g, m = gcfg.train.batch_size, gcfg.grpo.num_generations, gcfg.grpo.max_new_tokens
  sft_line = (f"sft: {sc.batch_size} x {sft_cfg.data.max_length} tokens, step "
              f"{results['sft_step_s']:.3f} s, {results['sft_tokens_per_s_per_device']:.0f} "
              f"tokens/s/device, MFU {results['sft_mfu']:.1%}")
  rollout_line = (f"rollout: {p} prompts x G={g}, {gcfg.data.max_length}-token prompts, {m} new "
                  f"tokens: {results['rollout_s']:.2f} s, "
                  f"{results['rollout_new_tokens_per_s']:.0f} new tokens/s")
  torch_tail = ""
  if torch_results is not None:
    t = torch_results
    from recllm_jax.train import metrics

    peak_flops, _ = metrics.peak_flops_per_device()
    flops_tok = metrics.flops_per_token(cfg, shapes["sft_len"])
    t["torch_sft_mfu"] = flops_tok * t["torch_sft_tokens_per_s_per_device"] / peak_flops
    ours_rollout_dev = results["rollout_new_tokens_per_s"] / n  # torch runs one device's share
    t["torch_shapes"] = shapes
    t["torch_devices_assumed"] = torch_n
    t["ratio_sft"] = _ratio(results["sft_tokens_per_s_per_device"],
                            t["torch_sft_tokens_per_s_per_device"])
    t["ratio_rollout"] = _ratio(ours_rollout_dev, t["torch_rollout_new_tokens_per_s"])
    t["ratio_rollout_shared_prefill"] = _ratio(ours_rollout_dev,
                                               t.get("torch_rollout_shared_new_tokens_per_s"))
    results.update(t)
    per_dev = "" if n == 1 else " per device"
    sft_line += (f" | torch{per_dev} ({shapes['sft_rows']} x {shapes['sft_len']}, fp32 params, "
                 f"bf16 autocast, grad checkpointing {t['torch_remat']}, "
                 f"{'fused ' if t['torch_device'] != 'cpu' else ''}AdamW,"
                 f" grad_accum {shapes['grad_accum']}): step {t['torch_sft_step_s']:.3f} s, "
                 f"{t['torch_sft_tokens_per_s_per_device']:.0f} tokens/s/device, MFU "
                 f"{t['torch_sft_mfu']:.1%}; ours/torch {_x(t['ratio_sft'])}")
    shared = t.get("torch_rollout_shared_new_tokens_per_s")
    shared_txt = (f"{shared:.0f} new tokens/s, ours/torch {_x(t['ratio_rollout_shared_prefill'])}"
                  if shared else f"failed ({t.get('torch_rollout_shared_error')})")
    rollout_line += (
        f" | torch{per_dev} ({shapes['prompts']} prompts x G={shapes['generations']}, bf16, "
        f"{t['torch_rollout_cache']} cache): generate(num_return_sequences={g}) prefills "
        f"{shapes['prompts'] * g} prompts where ours prefills {shapes['prompts']}: "
        f"{t['torch_rollout_new_tokens_per_s']:.0f} new tokens/s, ours/torch "
        f"{_x(t['ratio_rollout'])}; torch with a shared prefill ({shapes['prompts']} prompts "
        f"prefilled once, cache copied G times; decode still reads G copies of each prompt's "
        f"KV where ours reads one): {shared_txt}")
    torch_tail = (f" | torch sft {_x(t['ratio_sft'])} rollout {_x(t['ratio_rollout'])} "
                  f"({_x(t['ratio_rollout_shared_prefill'])} shared prefill)")
  elif torch_note:
    results["torch_note"] = torch_note
  print(sft_line)
  print(rollout_line)
  print(f"grpo step (rollout + ref log-probs + update): {results['grpo_step_s']:.2f} s")
  print(f"memory per device: after SFT peak {_gib(results['sft_peak_bytes'])} (plan "
        f"{_gib(plans['sft'].peak)}, XLA estimate of the step {_gib(results['sft_xla_bytes'])}); "
        f"after GRPO peak {_gib(results['peak_bytes'])} (plan max(SFT, GRPO) {_gib(planned)}: "
        f"GRPO rollout {_gib(plans['grpo'].rollout_peak)}, update {_gib(plans['grpo'].update_peak)}"
        f"; XLA estimate of the update {_gib(results['grpo_update_xla_bytes'])})"
        + (f"; torch peak allocated {_gib(results.get('torch_peak_bytes'))}"
           if results.get("torch_peak_bytes") else ""))
  print(f"accelerator: {device.device_kind} x{n} sft "
        f"{results['sft_tokens_per_s_per_device']:.0f} tok/s/dev MFU {results['sft_mfu']:.1%} | "
        f"rollout {results['rollout_new_tokens_per_s']:.0f} new tok/s | grpo step "
        f"{results['grpo_step_s']:.2f} s | peak {_gib(results['peak_bytes'])} "
        f"(plan {_gib(planned)}){torch_tail}", flush=True)
  if args.json:
    results.update(device=device.device_kind, platform=device.platform, devices=n,
                   jax_version=jax.__version__, args=vars(args),
                   shapes={"sft_batch": sc.batch_size, "sft_len": sft_cfg.data.max_length,
                           "grad_accum": sc.grad_accum_steps, "prompts": p, "generations": g,
                           "prompt_len": gcfg.data.max_length, "new_tokens": m})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path}", flush=True)
  return results


if __name__ == "__main__":
  main()
