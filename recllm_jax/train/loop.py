"""The one train loop, shared by every task (SFT, GRPO).

A task owns its step (`Task`): SFT runs one jitted update on a batch; GRPO samples a rollout,
scores it on the host and runs mu updates. The loop owns everything else, once:

    config checks -> mesh -> task (data, tokenizer) -> model -> optimizer -> train state
    restore-or-init (params, optimizer, RNG, data iterator)
    for step in steps:
      batch = next(data)                          # Grain, host numpy
      state, metrics, work = task.step(state, batch)
      NaN guard -> log (tokens/s, MFU) -> task.evaluate -> checkpoint
    save on exit (also on SIGTERM / SIGINT, at a step boundary)

Tasks are chosen by name (`config.task`) from `TASKS`. Re-running the same command resumes
from the latest checkpoint in `config.workdir`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from etils import epath
from tqdm.contrib.logging import logging_redirect_tqdm

from recllm_jax import distributed, paths, sharding
from recllm_jax.rec import cf_prior
from recllm_jax.errors import ConfigError, UserError
from recllm_jax.train import build, checkpoint, checks, drift, metrics as metrics_lib, optim
from recllm_jax.train.grpo import GrpoTask
from recllm_jax.train.sft import SftTask
from recllm_jax.train.task import Run, Task, Work

log = logging.getLogger(__name__)

# config.task -> its `Task` class.
TASKS: dict[str, type] = {"sft": SftTask, "grpo": GrpoTask}


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the state is not saved."""


def check_task(config: ml_collections.ConfigDict) -> None:
  """`config.task` is registered in `TASKS`, and its keys pass the task's `check_config`."""
  if config.task not in TASKS:
    raise ConfigError(f"task={config.task!r} is not a known task; expected one of {sorted(TASKS)}")
  TASKS[config.task].check_config(config)


def make_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
  """The `Task` registered as `config.task` in `TASKS`."""
  check_task(config)
  return TASKS[config.task](config, workdir)


@contextlib.contextmanager
def stop_requested() -> Iterator[list[int]]:
  """SIGTERM/SIGINT set a flag (the loop stops at the next step boundary, then saves).

  Stopping between steps keeps the saved params and data-iterator state consistent. A second
  SIGINT interrupts immediately. With several processes the loop ORs the flags of all of them
  every step (`distributed.any_process`), so a signal to any host stops all after the same step.
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


def _non_finite(step: int, metrics: dict[str, Any], last_saved: int | None) -> str | None:
  """An error message if the loss or gradient norm is NaN/inf, else None."""
  bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
  if not bad:
    return None
  return (f"step {step}: {', '.join(f'{k}={float(metrics[k])}' for k in bad)}; stopping "
          f"without saving. Last good checkpoint: step {last_saved} (resume from it with a "
          "lower train.lr or a smaller train.max_grad_norm).")


def _extra_state(task: Task) -> Any:
  """The task's own checkpointed state (`Task.extra_state`, optional), or None."""
  extra_state = getattr(task, "extra_state", None)
  return None if extra_state is None else extra_state()


PROFILE_DIR = "profile"  # <workdir>/profile: jax.profiler traces (`profile.steps`)


class StepProfiler:
  """A `jax.profiler` trace of loop steps `first..last` (1-based, both included) into `directory`.

  `steps=None` traces nothing. After a resume past `first`, tracing starts at the first step
  that runs (if still <= last). The trace is stopped after step `last` completes on the
  device (its metrics are fetched first), or by `stop()` when the loop ends early.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: epath.Path):
    self.steps = steps
    self.directory = directory
    self._active = False

  def before_step(self, step: int) -> None:
    """Called before step `step` (1-based) runs."""
    if self.steps and not self._active and self.steps[0] <= step <= self.steps[1]:
      log.info("profiling steps %d..%d into %s", step, self.steps[1], self.directory)
      jax.profiler.start_trace(str(self.directory))
      self._active = True

  def after_step(self, step: int, metrics: Any) -> None:
    """Called after step `step` returned `metrics` (blocked on, so its device work is traced)."""
    if self._active and step >= self.steps[1]:
      jax.block_until_ready(metrics)
      self.stop()

  def stop(self) -> None:
    if self._active:
      self._active = False
      jax.profiler.stop_trace()


def save_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    (workdir / build.CONFIG_FILE).write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs (or resumes) training as configured; returns the last logged metrics row.

  `train.log_every`, `eval_every` and `checkpoint_every` of 0 mean never (the final save on
  exit still happens); with `log_every=0` the returned row is empty.
  """
  config = checks.expand_paths(config)
  mesh = checks.check_config(config, check_task)
  workdir = paths.workdir_path(config.workdir)  # local, or gs://bucket/run
  workdir.mkdir(parents=True, exist_ok=True)
  # Drift on resume: a config that changes what the checkpoints mean is a one-line error naming
  # the keys, checked against the saved config.json before it is replaced (train/drift.py).
  resuming = bool(checkpoint.finalized_steps(workdir))
  if resuming:
    drift.check_resume_config(config, workdir)
  if config.get("init_from"):
    source = build.parse_init_from(config.init_from)
    if source.kind == "workdir":
      drift.check_item_codes(config, source.path, "init_from")
  distributed.barrier("resume_config_checked")  # every process read config.json before it changes
  save_config(config, workdir)
  tc = config.train
  # Measured before any data or checkpoint threads start competing for the CPU.
  peak, peak_source = metrics_lib.peak_flops_per_device(tc.peak_flops)
  metrics_lib.count_compiles()  # every row logs `xla_compiles` and `host_rss_mb`

  # Process 0 first: it writes what the others then reuse (synthetic data, a trained tokenizer).
  with distributed.main_process_first("make_task"):
    task = make_task(config, workdir)
  dataset = getattr(task, "dataset", None)
  drift.check_data(None if dataset is None else cf_prior.data_fingerprint(dataset), workdir,
                   resuming, config.data.dir)
  model = build.build_model(config, mesh, task.tokenizer)
  model_cfg = model.cfg
  num_updates = tc.num_steps * task.updates_per_step
  schedule = optim.make_schedule(tc.lr, num_updates, tc.warmup_steps, tc.min_lr_ratio)
  optimizer = optim.make_optimizer(schedule, weight_decay=tc.weight_decay,
                                   max_grad_norm=tc.max_grad_norm, b1=tc.b1, b2=tc.b2,
                                   eps=tc.get("eps", 1e-8),
                                   master_dtype=tc.master_dtype)
  # A LoRA run (model.lora.rank > 0) trains, and saves, only its adapters.
  trainable = optim.trainable_filter(model_cfg)
  graphdef, state = optim.init_train_state(model, optimizer, config.seed, wrt=trainable)
  del model  # the train state owns the parameters from here on

  data = task.train_iterator()
  ckpt = checkpoint.Checkpointer(workdir, every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                                 async_save=tc.async_checkpoint,
                                 saved_params=trainable if model_cfg.lora_rank else None,
                                 metadata=build.checkpoint_metadata(config))
  start = ckpt.latest_step() or 0
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  task.setup(Run(graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                 state_sharding=sharding.shardings_of(state), mesh=mesh, model_cfg=model_cfg,
                 writer=writer, initial_params=state.params, workdir=workdir,
                 trainable=trainable))
  # The newest intact step: a damaged one is skipped with a warning naming what was wrong, and
  # none intact is an error (NoIntactCheckpointError), never a silent fresh start.
  latest = start
  abstract_extra = _extra_state(task)
  start, state, extra = ckpt.restore_latest(state, data, abstract_extra)
  if start != latest:
    writer.rewind(start)
  if start and abstract_extra is not None:
    task.restore_extra_state(extra)
  last_saved = start or None
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("task %s: %s; peak %.3g FLOP/s per device (%s)", task.name,
           model_cfg.summary(num_params), peak, peak_source)
  log.debug("model config: %s", model_cfg)
  throughput = metrics_lib.Throughput(peak * jax.device_count())
  bar = metrics_lib.progress_bar(tc.num_steps, start)
  profiler = StepProfiler(checks.profile_steps(config), workdir / PROFILE_DIR)
  row: dict[str, Any] = {}
  step, consistent, healthy = start, True, True
  try:
    # logging_redirect_tqdm: a log line during training prints above the bar, not through it.
    with jax.set_mesh(mesh), stop_requested() as stop, logging_redirect_tqdm():
      # any_process: a signal seen by one host stops every host after the same step (so all
      # save that step together); one tiny collective per step with several processes.
      while step < tc.num_steps and not distributed.any_process(bool(stop)):
        profiler.before_step(step + 1)
        batch = next(data)
        consistent = False  # data advanced, state not yet
        state, m, work = task.step(state, batch)
        step += 1
        consistent = True
        profiler.after_step(step, m)
        throughput.add(work.tokens, work.flops)
        error = _non_finite(step, m, last_saved)
        if error:
          healthy = False  # the state is poisoned: keep the last checkpoint instead
          raise NonFiniteLossError(error)
        last = step == tc.num_steps
        if checks.is_due(step, tc.log_every) or (tc.log_every and last):
          row = writer.write(step, {**m, **throughput.update(), **metrics_lib.host_metrics()})
          bar.set_postfix(metrics_lib.progress_fields(row))
        if checks.is_due(step, tc.eval_every) or (tc.eval_every and last):
          held_out = task.evaluate(state)
          if held_out:
            writer.write(step, held_out)
        if ckpt.save(step, state, data, extra=_extra_state(task)):
          last_saved = step
        bar.update(1)
  finally:
    profiler.stop()
    bar.close()
    try:
      if healthy and consistent and step > (last_saved or 0):
        ckpt.save(step, state, data, force=True, extra=_extra_state(task))
    finally:
      try:
        ckpt.close()  # a failed (async) write is raised here: CheckpointWriteError
      finally:
        writer.close()
  return row


__all__ = ["NonFiniteLossError", "PROFILE_DIR", "Run", "StepProfiler", "TASKS", "Task", "Work",
           "make_task", "save_config", "stop_requested", "train"]
