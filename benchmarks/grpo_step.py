"""GRPO step time: our train loop's `GrpoTask` step vs TRL's `GRPOTrainer` (`use_cpu=True`).

Both sides train the same random Qwen2 (`benchmark_model()`: hidden 512, 8 layers, 8 / 2
heads, FFN 1408, vocab 8192; fp32, saved once as a Hugging Face directory that both load,
together with a byte-level BPE of that vocabulary) on the same prompts, in the same order:
P = 8 prompts x G = 8 samples, 64 new tokens at temperature 1 (top-p 1, no top-k), beta = 0.04
(a frozen reference model), one update per rollout (mu = 1), AdamW at the same settings.

  ours  `recllm_jax.train.loop.train` on `configs/grpo.py:tiny` with the settings above (what
        `python scripts/train.py --config configs/grpo.py:tiny --config.<key>=...` runs);
        step parts from `<workdir>/metrics.jsonl`; rewards: the configured composite.
  TRL   `GRPOTrainer` on the same rendered prompt strings (plain-text prompts, so TRL tokenizes
        exactly our text: the token ids are checked equal); a trivial reward function. TRL's
        activation-checkpointing default (`gradient_checkpointing=True`) is turned off, like
        ours (no remat).

Prompts are kept at ~50-60 tokens: synthetic users without a profile, only the newest history
item (`data.prompt.max_history_tokens=0`) and a short instruction (the default instruction alone
makes every prompt >= 61 tokens, and > 64 tokens moves our prompts into the 128-token bucket).

Printed per side: the step time (median of the steps after the warm-up ones) and its parts,
completion lengths, the step's model FLOPs by `GrpoTask._work`'s count (rollout 2N per token,
prompts prefilled once; the reference forward; one forward + backward of the trained rows), the
fp32 matmul peak measured in this run, and roofline time = FLOPs / peak. The last line is

  grpo_step: recllm_jax <s> s, trl <s> s, ratio <trl/ours>x, roofline <roofline time / ours>%

Needs the `bench` extra (`pip install -e '.[bench]'`: TRL and CPU torch).

  python benchmarks/grpo_step.py                       # the issue-8 measurement (minutes)
  python benchmarks/grpo_step.py --steps 3 --warmup 2 --trl-steps 2 --trl-warmup 1 \\
      --prompts 2 --generations 2 --new-tokens 8 --layers 2   # smoke run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is imported as scripts/train.py does

# Short enough that one-item prompts stay within 64 tokens (see the module docstring).
INSTRUCTION = "Recommend the next item."
FILLER_WORDS = 20000


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--prompts", type=int, default=8, help="P prompts per step")
  p.add_argument("--generations", type=int, default=8, help="G samples per prompt")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--steps", type=int, default=6, help="our steps, warm-up included")
  p.add_argument("--warmup", type=int, default=2, help="our first steps left out (compiles)")
  p.add_argument("--trl-steps", type=int, default=4, help="TRL steps, warm-up included")
  p.add_argument("--trl-warmup", type=int, default=1)
  p.add_argument("--beta", type=float, default=0.04)
  p.add_argument("--history-tokens", type=int, default=0,
                 help="data.prompt.max_history_tokens (0: the newest item only)")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--intermediate", type=int, default=1408)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--tmp", default=None, help="scratch directory (default: a temporary one)")
  args = p.parse_args()
  if args.steps <= args.warmup or args.trl_steps <= args.trl_warmup:
    p.error("--steps / --trl-steps must exceed their warm-up steps")
  return args


# --- shared inputs -----------------------------------------------------------------------------


def make_inputs(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Any]:
  """Synthetic data, a BPE of the model's vocabulary and the random model (HF dir, fp32).

  The BPE also learns seeded random filler words: the synthetic texts alone give only ~1k
  tokens, and a random model samples uniformly-ish over all 8192 ids, so every id must decode
  to text on both sides.
  """
  import torch
  import transformers

  from recllm_jax.data.loading import load_dataset
  from recllm_jax.data.prompts import PromptConfig
  from recllm_jax.data.synthetic import generate_synthetic
  from recllm_jax.data.tokenizer import train_bpe_tokenizer
  from recllm_jax.models.config import benchmark_model
  from recllm_jax.train.sft import tokenizer_texts

  data_dir = generate_synthetic(root / "data", profile_fraction=0.0)
  dataset = load_dataset(data_dir, "synthetic")
  prompt_cfg = PromptConfig(target_format="cot", instruction=INSTRUCTION)
  texts = [item.title for item in dataset.catalog]
  texts += tokenizer_texts(dataset.train, dataset.catalog, prompt_cfg, count=len(dataset.train))
  rng = random.Random(0)
  words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9)))
           for _ in range(FILLER_WORDS)]
  texts += [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] * 2  # min_frequency 2
  hf_dir = root / "hf"
  tokenizer = train_bpe_tokenizer(texts, hf_dir, vocab_size=args.vocab)

  cfg = benchmark_model(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf_dict())).float()
  model.save_pretrained(hf_dir, safe_serialization=True)
  # transformers 5 loads any tokenizer next to a qwen2 config.json as `Qwen2Tokenizer`, which
  # adds "<|endoftext|>" when missing: leave room for it, so the loaded vocab is the model's.
  extra = len(transformers.AutoTokenizer.from_pretrained(hf_dir)) - len(tokenizer)
  if extra:
    train_bpe_tokenizer(texts, hf_dir, vocab_size=args.vocab - extra)
  return hf_dir, data_dir, cfg


def our_config(args: argparse.Namespace, hf_dir: Path, data_dir: Path, workdir: Path):
  """`configs/grpo.py:tiny` with the benchmark's settings (as `--config.<key>=...` flags)."""
  from configs.grpo import get_config

  config = get_config("tiny")
  with config.unlocked():
    config.workdir = str(workdir)
    config.init_from = str(hf_dir)
    config.data.dir = str(data_dir)
    config.data.format = "synthetic"
    config.data.prompt.max_history_tokens = args.history_tokens
    config.data.prompt.instruction = INSTRUCTION
    g = config.grpo
    g.rollout = "cot"
    g.num_generations = args.generations
    g.max_new_tokens = args.new_tokens
    g.temperature, g.top_p, g.top_k = 1.0, 1.0, 0
    g.beta = args.beta
    g.num_iterations = 1
    g.samples_every = 0
    t = config.train
    t.batch_size = args.prompts
    t.num_steps = args.steps
    t.log_every, t.eval_every, t.checkpoint_every = 1, 0, 0
  return config


def planned_prompts(config, workdir: Path, steps: int) -> list[list[tuple[str, list[int]]]]:
  """The (text, ids) prompts of each of our first `steps` steps, in order.

  A fresh `GrpoTask` iterator with the run's seed yields the batches the train loop will see.
  """
  from recllm_jax.train.grpo import GrpoTask

  workdir.mkdir(parents=True, exist_ok=True)  # as the loop does before making its task
  task = GrpoTask(config, workdir)
  data = task.train_iterator()
  return [[task.prompt("train", int(i)) for i in next(data)["example_index"]]
          for _ in range(steps)]


def step_flops(cfg: Any, prompt_lengths: list[int], completion_lengths: list[int], *,
               group: int, max_new_tokens: int, beta: float) -> float:
  """Model FLOPs of one GRPO step by `GrpoTask._work`'s count (mu = 1), for given lengths.

  Calls `_work` itself on a stand-in task, so both sides are counted exactly like our loop
  counts its own steps.
  """
  from recllm_jax import buckets
  from recllm_jax.train import grpo

  lengths = np.asarray(prompt_lengths)
  bucket = buckets.geometric_bucket(int(lengths.max()))
  mask = (np.arange(bucket)[None, :] >= bucket - lengths[:, None]).astype(np.int32)  # [P, T]
  done = np.asarray(completion_lengths, np.int32)  # [P * G]
  rollout = grpo.Rollout(tokens=np.zeros((len(done), max_new_tokens), np.int32), lengths=done,
                         truncated=np.zeros(len(done), bool))
  rows = grpo.training_rows(np.zeros_like(mask), mask, rollout, group)
  stand_in = types.SimpleNamespace(run=types.SimpleNamespace(model_cfg=cfg), updates_per_step=1,
                                   ref_params=() if beta > 0 else None)
  return grpo.GrpoTask._work(stand_in, {"attention_mask": mask}, rows, rollout).flops


# --- our side ----------------------------------------------------------------------------------


@contextlib.contextmanager
def instrumented_grpo_task(record: dict[str, list]):
  """Records per `GrpoTask.step`: its Work, compiles, the reference forward's time (blocked on),
  and the loop interval (start to start, so the loop's own per-step overhead shows)."""
  import jax

  from recllm_jax.train.grpo import GrpoTask

  compiles: list[float] = []

  def on_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  step, setup = GrpoTask.step, GrpoTask.setup

  def timed_setup(self, run):
    setup(self, run)
    logprob_fn = self.logprob_fn

    def timed_logprob_fn(params, rows):
      t0 = time.perf_counter()
      out = jax.block_until_ready(logprob_fn(params, rows))
      record["time_ref"][-1] += time.perf_counter() - t0
      return out

    self.logprob_fn = timed_logprob_fn

  def counted_step(self, state, batch):
    record["start"].append(time.perf_counter())
    record["time_ref"].append(0.0)
    before, spent = len(compiles), sum(compiles)
    state, metrics, work = step(self, state, batch)
    record["compiles"].append(len(compiles) - before)
    record["compile_s"].append(sum(compiles) - spent)
    record["work"].append(work)
    record["prompt_lengths"].append([int(n) for n in batch["attention_mask"].sum(axis=1)])
    return state, metrics, work

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    with mock.patch.object(GrpoTask, "step", counted_step), \
         mock.patch.object(GrpoTask, "setup", timed_setup):
      yield
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def run_ours(config) -> tuple[list[dict[str, Any]], dict[str, list]]:
  """Runs the train loop; returns (metrics.jsonl rows, instrumentation records)."""
  from recllm_jax.train.loop import train

  record: dict[str, list] = collections.defaultdict(list)
  with instrumented_grpo_task(record):
    train(config)
  rows = [json.loads(line) for line in (Path(config.workdir) / "metrics.jsonl").open()]
  return [r for r in rows if "time_step" in r], record


# --- TRL -----------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, hf_dir: Path, prompts: list[str], lr: float, b2: float,
            max_grad_norm: float, out_dir: Path) -> list[dict[str, Any]]:
  """TRL's GRPOTrainer on `prompts` in order (P per step); per-step times and parts."""
  import datasets
  import torch
  import transformers
  from trl import GRPOConfig, GRPOTrainer

  parts: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def timed(name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      parts[name] += time.perf_counter() - t0

  class TimedGRPOTrainer(GRPOTrainer):
    """Times the parts of a step: generate, rewards, reference forward, scoring overall."""

    def _generate_single_turn(self, *a, **k):
      with timed("rollout"):
        out = super()._generate_single_turn(*a, **k)
      parts["completion_lengths"] = [len(c) for c in out[0]]
      return out

    def _calculate_rewards(self, *a, **k):
      with timed("reward"):
        return super()._calculate_rewards(*a, **k)

    def _get_per_token_logps_and_entropies(self, *a, **k):
      with timed("ref" if not torch.is_grad_enabled() else "policy_forward"):
        return super()._get_per_token_logps_and_entropies(*a, **k)

    def _generate_and_score_completions(self, *a, **k):
      with timed("generate_and_score"):
        return super()._generate_and_score_completions(*a, **k)

  class StepTimer(transformers.TrainerCallback):
    def __init__(self):
      self.rows: list[dict[str, Any]] = []

    def on_step_begin(self, *a, **k):
      parts.clear()
      self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
      self.rows.append({"time_step": time.perf_counter() - self.t0, **parts})

    def on_log(self, args, state, control, logs=None, **k):
      if logs and self.rows:  # the step's metrics, then (last step) the run's summary
        self.rows[-1].setdefault("logs", {}).update(logs)

  def length_reward(completions, **kwargs):
    """Trivial host reward (TRL needs one): completion characters / 100."""
    return [len(c) / 100 for c in completions]

  config = GRPOConfig(
      output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=0,
      per_device_train_batch_size=args.prompts * args.generations,  # rows
      gradient_accumulation_steps=1, num_generations=args.generations,
      max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
      beta=args.beta, epsilon=0.2, num_iterations=1, loss_type="grpo",
      learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=b2, adam_epsilon=1e-8, max_grad_norm=max_grad_norm,
      activation_checkpointing=False, shuffle_dataset=False, max_steps=args.trl_steps,
      logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
      dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32})
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  timer = StepTimer()
  trainer = TimedGRPOTrainer(
      model=str(hf_dir), reward_funcs=length_reward, args=config, processing_class=tokenizer,
      train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
  trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
  assert not trainer.model.is_activation_checkpointing, "TRL's model would recompute activations"
  trainer.train()
  return timer.rows


# --- report -------------------------------------------------------------------------------------


def _median(xs) -> float:
  return statistics.median(xs) if len(xs) else float("nan")


def _fmt(xs, digits: int = 2) -> str:
  return ", ".join(f"{x:.{digits}f}" for x in xs)


def report_ours(args: argparse.Namespace, cfg: Any, ours: list[dict[str, Any]],
                record: dict[str, list], peak: float) -> tuple[float, float]:
  """Prints our step time, parts and FLOPs; returns (median step s, median step FLOPs)."""
  from recllm_jax.train import metrics

  timed = ours[args.warmup:]
  t_ours = _median([r["time_step"] for r in timed])
  flops = _median([w.flops for w in record["work"][args.warmup:]])
  # `step_flops` (used for TRL) recounts our last step from its mean completion length.
  recount = step_flops(cfg, record["prompt_lengths"][-1],
                       [round(ours[-1]["completion_len"])] * (args.prompts * args.generations),
                       group=args.generations, max_new_tokens=args.new_tokens, beta=args.beta)
  print(f"step FLOPs (GrpoTask._work's count, matmul params N = "
        f"{metrics.matmul_params(cfg) / 1e6:.1f}M): {flops / 1e12:.3f} TFLOP -> roofline "
        f"{flops / peak:.2f} s at the measured peak (last step {record['work'][-1].flops / 1e12:.3f}"
        f", recounted from its mean completion length {recount / 1e12:.3f})")
  intervals = list(np.diff(record["start"])[max(args.warmup - 1, 0):])
  print(f"recllm_jax: step {t_ours:.2f} s (median of steps {args.warmup + 1}-{args.steps}: "
        f"{_fmt(r['time_step'] for r in timed)}); all steps: {_fmt(r['time_step'] for r in ours)}")
  print(f"  parts (median): rollout {_median([r['time_rollout'] for r in timed]):.2f} s, "
        f"reward+advantages {_median([r['time_reward'] for r in timed]):.3f} s, "
        f"update {_median([r['time_update'] for r in timed]):.2f} s (of which ref forward "
        f"{_median(record['time_ref'][args.warmup:]):.2f} s); loop interval start-to-start "
        f"{_median(intervals):.2f} s")
  print(f"  completion_len {_fmt((r['completion_len'] for r in timed), 1)} (truncated "
        f"{np.mean([r['frac_truncated'] for r in timed]):.0%}); compiles per step "
        f"{record['compiles']} ({_fmt(record['compile_s'], 1)} s); "
        f"MFU {flops / t_ours / peak:.1%}")
  return t_ours, flops


def report_trl(args: argparse.Namespace, cfg: Any, theirs: list[dict[str, Any]],
               prompt_lengths: list[int], peak: float) -> float:
  """Prints TRL's step time, parts and FLOPs; returns its median step time."""
  from recllm_jax.train import metrics

  p, g = args.prompts, args.generations
  timed = theirs[args.trl_warmup:]
  t_trl = _median([r["time_step"] for r in timed])
  flops = _median([step_flops(cfg, prompt_lengths[i * p:(i + 1) * p], r["completion_lengths"],
                              group=g, max_new_tokens=args.new_tokens, beta=args.beta)
                   for i, r in enumerate(theirs) if i >= args.trl_warmup])
  part = lambda key: _median([r.get(key, 0.0) for r in timed])
  update = _median([r["time_step"] - r["generate_and_score"] for r in timed])
  other = _median([r["generate_and_score"] - r["rollout"] - r["reward"] - r.get("ref", 0.0)
                   for r in timed])
  print(f"trl: step {t_trl:.2f} s (median of steps {args.trl_warmup + 1}-{args.trl_steps}: "
        f"{_fmt(r['time_step'] for r in timed)}); all steps: {_fmt(r['time_step'] for r in theirs)}")
  print(f"  parts (median): rollout (generate) {part('rollout'):.2f} s, reward "
        f"{part('reward'):.3f} s, ref forward {part('ref'):.2f} s, update (policy fwd+bwd+AdamW) "
        f"{update:.2f} s, other scoring {other:.2f} s")
  logged = [r.get("logs", {}).get("completions/mean_length") for r in timed]
  repeated_prefill = 2 * metrics.matmul_params(cfg) * (g - 1) * float(np.mean(prompt_lengths)) * p
  print(f"  completion length {_fmt((np.mean(r['completion_lengths']) for r in timed), 1)} "
        f"(TRL's log: {_fmt((x for x in logged if x is not None), 1)}); useful FLOPs by our count "
        f"{flops / 1e12:.3f} TFLOP (+{repeated_prefill / 1e12:.3f} TFLOP of repeated prefill); "
        f"MFU {flops / t_trl / peak:.1%}")
  return t_trl


def main() -> None:
  args = parse_args()
  logging.basicConfig(level=logging.WARNING)
  import jax
  import torch
  import transformers
  import trl

  from recllm_jax.train import metrics

  transformers.logging.set_verbosity_error()
  warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
  torch.set_num_threads(os.cpu_count() or 1)
  load_before = os.getloadavg()[0]
  peaks = [metrics.measure_matmul_flops(2048)]
  with contextlib.ExitStack() as stack:
    root = Path(args.tmp) if args.tmp else Path(stack.enter_context(tempfile.TemporaryDirectory()))
    hf_dir, data_dir, cfg = make_inputs(args, root)
    config = our_config(args, hf_dir, data_dir, root / "ours")
    plan = planned_prompts(config, root / "probe", max(args.steps, args.trl_steps))
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = [text for batch in plan for text, _ in batch]
    same_ids = tokenizer(text=texts)["input_ids"] == [ids for batch in plan for _, ids in batch]
    prompt_lengths = [len(ids) for batch in plan for _, ids in batch]

    ours, record = run_ours(config)
    peaks.append(metrics.measure_matmul_flops(2048))
    tc = config.train
    theirs = run_trl(args, hf_dir, texts[:args.trl_steps * args.prompts], lr=tc.lr, b2=tc.b2,
                     max_grad_norm=tc.max_grad_norm, out_dir=root / "trl")
    peaks.append(metrics.measure_matmul_flops(2048))
  peak = max(peaks)

  p, g = args.prompts, args.generations
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} (JAX), {os.cpu_count()} "
        f"CPUs, torch threads {torch.get_num_threads()}, 1-min load average {load_before:.1f} "
        f"before / {os.getloadavg()[0]:.1f} after; trl {trl.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, jax {jax.__version__}")
  print(f"model: random Qwen2 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, FFN {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, fp32")
  print(f"prompts: {p} per step x G={g}, {min(prompt_lengths)}-{max(prompt_lengths)} tokens "
        f"(mean {np.mean(prompt_lengths):.1f}); TRL tokenizes the same ids: "
        f"{'yes' if same_ids else 'NO'}; {args.new_tokens} new tokens, temperature 1, top-p 1, "
        f"beta {args.beta}, mu 1, lr {tc.lr:g}")
  print("rewards: recllm_jax the configured composite ("
        + ", ".join(f"{k} {v:g}" for k, v in config.rewards.to_dict().items() if v)
        + "); TRL a trivial one (completion characters / 100)")
  print(f"measured fp32 2048^2 matmul (JAX): {peak / 1e9:.1f} GFLOP/s (best of "
        f"{_fmt((x / 1e9 for x in peaks), 0)}: start, between the sides, end)")
  t_ours, flops = report_ours(args, cfg, ours, record, peak)
  t_trl = report_trl(args, cfg, theirs, prompt_lengths, peak)
  print("shortcuts: we prefill each prompt once per group and share its KV cache (TRL "
        f"prefills every prompt G={g} times); both decode with a KV cache (ours: one compiled "
        "loop over a preallocated cache; TRL: transformers.generate, a Python loop with a "
        "DynamicCache). Both project only completion positions to the vocabulary (TRL: "
        "logits_to_keep; ours: in chunks); we pad prompts to a 64-token bucket. Neither "
        "computes old log-probs (mu = 1).")
  print(f"grpo_step: recllm_jax {t_ours:.2f} s, trl {t_trl:.2f} s, ratio {t_trl / t_ours:.2f}x, "
        f"roofline {flops / peak / t_ours:.1%}")


if __name__ == "__main__":
  main()
