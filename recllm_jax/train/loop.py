"""The train loop shared by every task (SFT now, GRPO later).

A task supplies the tokenizer, the data and a loss (`Task`); this module supplies the rest:
model, optimizer, jitted step, checkpoints, metrics, resume and safety stops.

    state = restore-or-init
    for step in steps:
      batch = next(data)                       # grain, host numpy
      state, metrics = train_step(state, batch)  # jit, donated state
      check finite -> log -> eval -> checkpoint

Re-running the same command resumes from the latest checkpoint in `config.workdir`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grain
import jax
import ml_collections
from flax import nnx

from recllm_jax import sharding
from recllm_jax.data import pipeline
from recllm_jax.models import PRESETS, Qwen2ForCausalLM
from recllm_jax.models.config import Qwen2Config
from recllm_jax.train import checkpoint, metrics as metrics_lib, optim

log = logging.getLogger(__name__)

DEEPSEEK_URL = "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
# Architecture keys a config may override on top of `model.preset` (0 = keep the preset's).
ARCH_OVERRIDES = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the state is not saved."""


class Task(Protocol):
  """What a trainer provides to the loop."""

  name: str
  tokenizer: Any  # a `transformers` tokenizer; the model's vocabulary must cover it
  loss_fn: optim.LossFn

  def train_iterator(self) -> grain.DatasetIterator: ...

  def eval_batches(self) -> Iterator[pipeline.Batch]: ...


def make_task(config: ml_collections.ConfigDict, workdir: Path) -> Task:
  if config.task == "sft":
    from recllm_jax.train.sft import SftTask
    return SftTask(config, workdir)
  raise ValueError(f"unknown task {config.task!r}; expected 'sft'")


def uses_pretrained(model_cfg: ml_collections.ConfigDict) -> bool:
  """`model.hf_path` set, or `model.preset='hf'` (which requires it): load HF weights."""
  return bool(model_cfg.hf_path) or model_cfg.preset == "hf"


def check_model_path(model_cfg: ml_collections.ConfigDict) -> None:
  """Fails early (before loading data) when the pretrained weights are not on disk."""
  if not uses_pretrained(model_cfg):
    return
  path = model_cfg.hf_path
  if not path or not Path(path).joinpath("config.json").exists():
    where = f"model.hf_path={path!r} does not exist" if path else "model.hf_path is empty"
    raise FileNotFoundError(
        f"{where}. This preset fine-tunes pretrained weights, which must be downloaded first "
        f"({DEEPSEEK_URL}):\n"
        "  huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B "
        "--local-dir /path/to/DeepSeek-R1-Distill-Qwen-1.5B\n"
        "then pass --config.model.hf_path=/path/to/DeepSeek-R1-Distill-Qwen-1.5B")


def model_config(model_cfg: ml_collections.ConfigDict, vocab_size: int,
                 **token_ids: int | None) -> Qwen2Config:
  """The random-init architecture: `model.preset` + overrides, vocab matched to the tokenizer.

  `token_ids` (bos/eos/pad_token_id) are recorded so an exported checkpoint generates and
  stops like the tokenizer expects.
  """
  if model_cfg.preset not in PRESETS:
    raise ValueError(f"unknown model.preset {model_cfg.preset!r}; expected 'hf' or one of "
                     f"{sorted(PRESETS)}")
  overrides = {k: model_cfg[k] for k in ARCH_OVERRIDES if model_cfg.get(k)}
  return PRESETS[model_cfg.preset](
      vocab_size=vocab_size, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype,
      remat=model_cfg.remat, **overrides, **token_ids)


def build_model(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, tokenizer: Any,
                seed: int) -> Qwen2ForCausalLM:
  """Pretrained weights from `model.hf_path`, or a random init created directly sharded."""
  vocab_size = len(tokenizer)
  if uses_pretrained(model_cfg):
    from recllm_jax.hf_io import load_hf_model
    model = load_hf_model(model_cfg.hf_path, dtype=model_cfg.param_dtype, mesh=mesh,
                          compute_dtype=model_cfg.dtype, remat=model_cfg.remat)
    if model.cfg.vocab_size < vocab_size:
      raise ValueError(f"tokenizer has {vocab_size} tokens but the model only "
                       f"{model.cfg.vocab_size} embeddings")
    return model
  cfg = model_config(model_cfg, vocab_size, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed)), mesh)


@contextlib.contextmanager
def stop_requested() -> Iterator[list[int]]:
  """SIGTERM/SIGINT set a flag (the loop stops at the next step boundary, then saves).

  Stopping between steps keeps the saved params and data-iterator state consistent. A second
  SIGINT interrupts immediately.
  """
  flag: list[int] = []

  def handler(signum, frame):
    if flag and signum == signal.SIGINT:
      raise KeyboardInterrupt
    flag.append(signum)
    log.warning("received signal %d: stopping after this step", signum)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def evaluate(eval_step, params: nnx.State, batches: Iterator[pipeline.Batch],
             mesh: jax.sharding.Mesh) -> float | None:
  """Token-weighted mean loss over the validation batches (None without validation data)."""
  total, weight = 0.0, 0.0
  for batch in batches:
    loss_sum, w = jax.device_get(eval_step(params, pipeline.to_global(batch, mesh)))
    total, weight = total + float(loss_sum), weight + float(w)
  return total / weight if weight else None


def _non_finite(step: int, metrics: dict[str, Any], last_saved: int | None) -> str | None:
  """An error message if the loss or gradient norm is NaN/inf, else None."""
  bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
  if not bad:
    return None
  return (f"step {step}: {', '.join(f'{k}={float(metrics[k])}' for k in bad)}; stopping "
          f"without saving. Last good checkpoint: step {last_saved} (resume from it with a "
          "lower train.lr or a smaller train.max_grad_norm).")


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs (or resumes) training as configured; returns the last logged metrics row."""
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_model_path(config.model)
  save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tc = config.train
  # Measured before any data or checkpoint threads start competing for the CPU.
  peak, peak_source = metrics_lib.peak_flops_per_device(tc.peak_flops)

  task = make_task(config, workdir)
  model = build_model(config.model, mesh, task.tokenizer, config.seed)
  model_cfg = model.cfg
  schedule = optim.make_schedule(tc.lr, tc.num_steps, tc.warmup_steps, tc.min_lr_ratio)
  optimizer = optim.make_optimizer(schedule, weight_decay=tc.weight_decay,
                                   max_grad_norm=tc.max_grad_norm, b1=tc.b1, b2=tc.b2)
  graphdef, state = optim.init_train_state(model, optimizer, config.seed)
  del model  # the train state owns the parameters from here on
  train_step = optim.make_train_step(graphdef, optimizer, task.loss_fn, schedule,
                                     tc.grad_accum_steps, optim.state_shardings(state))
  eval_step = optim.make_eval_step(graphdef, task.loss_fn)

  data = task.train_iterator()
  ckpt = checkpoint.Checkpointer(workdir, every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                                 async_save=tc.async_checkpoint)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state, data)
  last_saved = start or None
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  log.info("model: %s; %d params; peak %.3g FLOP/s per device (%s)", model_cfg,
           sum(x.size for x in jax.tree.leaves(state.params)), peak, peak_source)
  throughput = metrics_lib.Throughput(lambda t: metrics_lib.flops_per_token(model_cfg, t),
                                      peak * jax.device_count())
  bar = metrics_lib.progress_bar(tc.num_steps, start)
  row: dict[str, Any] = {}
  step, consistent, healthy = start, True, True
  try:
    with jax.set_mesh(mesh), stop_requested() as stop:
      while step < tc.num_steps and not stop:
        batch = next(data)
        consistent = False  # data advanced, state not yet
        state, m = train_step(state, pipeline.to_global(batch, mesh))
        m = jax.device_get(m)
        step += 1
        consistent = True
        throughput.add(pipeline.num_tokens(batch) * jax.process_count(),
                       batch["input_ids"].shape[1])
        error = _non_finite(step, m, last_saved)
        if error:
          healthy = False  # the state is poisoned: keep the last checkpoint instead
          raise NonFiniteLossError(error)
        if step % tc.log_every == 0 or step == tc.num_steps:
          row = writer.write(step, {**m, **throughput.update()})
          bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
        if tc.eval_every and (step % tc.eval_every == 0 or step == tc.num_steps):
          val_loss = evaluate(eval_step, state.params, task.eval_batches(), mesh)
          if val_loss is not None:
            writer.write(step, {"val_loss": val_loss})
        if ckpt.save(step, state, data):
          last_saved = step
        bar.update(1)
  finally:
    bar.close()
    if healthy and consistent and step > (last_saved or 0):
      ckpt.save(step, state, data, force=True)
    ckpt.close()
    writer.close()
  return row


__all__ = ["NonFiniteLossError", "Task", "build_model", "check_model_path", "evaluate",
           "make_task", "model_config", "stop_requested", "train"]
