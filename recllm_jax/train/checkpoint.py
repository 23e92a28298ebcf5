"""Orbax checkpoints of the train state and the Grain iterator in `<workdir>/checkpoints`.

Each step directory holds two items: `state` (params, optimizer moments, step, RNG; saved
sharded, restored straight into the current mesh's shardings) and `data` (the Grain
iterator state, one JSON file per process), plus a third, `task`, when the task has state of
its own (`Task.extra_state`, e.g. GRPO's synced reference model). Saves are asynchronous;
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest one.

A LoRA run (`model.lora.rank > 0`) saves only its adapters (`nnx.LoRAParam`) and their optimizer
state, and records its base in each step's metadata (`metadata.lora`, `metadata.base`: the
init_from / hf_path / preset and seed the base is rebuilt from); a resume rebuilds that base from
the config, checks the pointer and restores the adapters onto it.

What a resume survives (docs/training.md, "What survives what"):
  * a damaged newest step (a file truncated or deleted, unreadable metadata): `restore_latest`
    warns, naming the step and the exception, moves that step aside into
    `<workdir>/checkpoints.damaged/` and falls back to the newest intact step (its params, optimizer,
    data iterator and task state all from that one step). With no intact step left it stops
    with `NoIntactCheckpointError`, never silently starting from scratch.
  * a failed write (`ENOSPC`, a full quota): `CheckpointWriteError` names the step, the
    directory and the disk's free space; the earlier steps are untouched (Orbax writes into a
    temporary directory and deletes old steps only after a new one is complete).
  * another process count: the data iterator state is one file per process, but every process
    holds the same batch index (`data.pipeline.process_batches`), so it is re-sharded to the
    new count when the saved files agree; otherwise `ProcessCountError` says what to do.
  * a kill -9 during a save: the step's `<step>.orbax-checkpoint-tmp` directory is never counted
    (`finalized_steps`, Orbax's `all_steps`), the resume starts from the step before, and saving
    that step again replaces the partial directory. Tests kill at that moment deterministically
    with `RECLLM_FAULT_KILL_AT_SAVE=<step>` (`FAULT_KILL_AT_SAVE`, test-only fault injection):
    the process SIGKILLs itself as soon as the save of `<step>` has started, that is with
    asynchronous saves (`train.async_checkpoint`, the default) while the temporary directory
    exists and the state write is in flight; a synchronous save is complete by then.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from recllm_jax import distributed, paths
from recllm_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

TASK_ITEM = "task"  # the optional item holding a task's own state (`Task.extra_state`)
DAMAGED_DIR = "checkpoints.damaged"  # <workdir>/checkpoints.damaged/<step>: steps set aside
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # grain.checkpoint's per-process file
# Test-only fault injection (module docstring): SIGKILL once the save of this step started.
FAULT_KILL_AT_SAVE = "RECLLM_FAULT_KILL_AT_SAVE"


class NoIntactCheckpointError(UserError, RuntimeError):
  """The workdir has checkpoints, but none of them can be restored."""


class CheckpointWriteError(UserError, OSError):
  """A checkpoint could not be written (disk full, quota, permissions): names the disk."""


class ProcessCountError(UserError, RuntimeError):
  """A checkpoint's data iterator state cannot be mapped onto this run's process count."""


def finalized_steps(workdir: str | os.PathLike) -> list[int]:
  """The complete checkpoint steps in `<workdir>/checkpoints`, oldest first (no Orbax manager,
  so cheap: what a resume would start from, before anything is built)."""
  directory = paths.workdir_path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and ocp.step.is_path_finalized(p))


def _disk(directory: Any) -> str:
  """`directory`'s disk, for an error message: its free space when it is local."""
  try:
    usage = shutil.disk_usage(str(directory))
  except (OSError, ValueError):
    return str(directory)
  gib = 1024 ** 3
  return f"disk of {directory}: {usage.free / gib:.2f} GiB free of {usage.total / gib:.2f} GiB"


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`'s arrays: what Orbax restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Keeps the last `keep` checkpoints; `save` every `every` steps (0: only when forced)."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True, saved_params: Any = None,
               metadata: dict[str, Any] | None = None):
    """`saved_params`: an nnx filter of the params to save (None: all). A LoRA run saves only
    `nnx.LoRAParam` (and the optimizer state, which covers only them); `metadata` (JSON, e.g.
    the base model's pointer) is written with every step and checked on restore."""
    self.directory = paths.workdir_path(workdir) / "checkpoints"  # Orbax takes gs:// too
    if every < 0:
      raise ConfigError(f"train.checkpoint_every={every} must be >= 0 (0 = only the final save)")
    # Orbax's own interval is 1: `save` below decides, so every=0 saves only when forced.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True)
    self.every = every
    self.saved_params = saved_params
    self.metadata = dict(metadata or {})
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", TASK_ITEM))
    self._pending: int | None = None  # the last save started (an async error belongs to it)
    self._write_error: CheckpointWriteError | None = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           force: bool = False, extra: Any = None) -> bool:
    """Starts an (async) save; returns whether one was started (interval or `force`).
    `extra`: the task's own state (a pytree of arrays), saved as the `task` item if given."""
    due = self.every > 0 and step % self.every == 0
    if self._write_error is not None:
      return False  # reported once, when it happened; the earlier steps stay as they are
    if not (force or due) or step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(self._on_disk(state)[0]),
             "data": grain.checkpoint.CheckpointSave(data_iterator)}
    if extra is not None:
      items[TASK_ITEM] = ocp.args.StandardSave(extra)
    with self._write_errors(step):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force,
                                 custom_metadata=self.metadata or None)
    if saved:
      self._pending = step  # an async error raised by a later call belongs to this step
      log.info("saving checkpoint %d to %s", step, self.directory)
      if os.environ.get(FAULT_KILL_AT_SAVE) == str(step):  # tests only (module docstring)
        log.warning("%s=%d: killing this process during the save", FAULT_KILL_AT_SAVE, step)
        os.kill(os.getpid(), signal.SIGKILL)
    return saved

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """An OSError while writing (here, or raised later by an async save) becomes a one-line
    `CheckpointWriteError` naming the step, the directory and its disk. After one, saving
    stops: the earlier steps stay as they are."""
    try:
      yield
    except OSError as e:
      where = f" at {e.filename}" if e.filename else ""
      # The step whose file failed (an async error surfaces in a later call).
      match = re.search(r"/checkpoints/(\d+)(?:\.orbax-checkpoint-tmp[^/]*)?/", str(e.filename or ""))
      step = int(match[1]) if match else (step if step is not None else self._pending)
      reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
      self._write_error = CheckpointWriteError(
          f"writing checkpoint {step} failed: {reason}{where}; {_disk(self.directory)}. The "
          f"earlier steps are intact ({self.saved_steps_text()}); free space and rerun to resume "
          "from the latest")
      self._write_error.errno = e.errno
      raise self._write_error from e

  def saved_steps_text(self) -> str:
    try:
      return "complete steps: " + (", ".join(map(str, finalized_steps(self.directory.parent)))
                                   or "none")
    except OSError:
      return "complete steps unknown"

  def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator,
                     abstract_extra: Any = None) -> tuple[int, Any, Any]:
    """(step, state, task state) of the newest checkpoint that restores completely; (0,
    `abstract_state`, None) when there is none (a fresh start).

    A step that fails to restore (a truncated or missing file, unreadable metadata) is logged
    as a warning naming the step and the exception, moved into `<workdir>/checkpoints.damaged/`
    (so that the run can write that step again), and the next older one is tried. Every item
    of the returned step (params, optimizer, data iterator, `abstract_extra`'s task state) comes
    from that one step, so the resume stays exact. A `UserError` (e.g. a LoRA base mismatch) is
    no damage and is raised as is. Raises `NoIntactCheckpointError` when no step restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, extra = self._restore(step, abstract_state, data_iterator, abstract_extra)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001  (any failure to read a step means it is damaged)
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        damaged.append((step, why))
        log.warning("checkpoint %d in %s is damaged and is skipped (%s); trying an older step",
                    step, self.directory, why)
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged])
        log.warning("resuming from checkpoint %d, the newest intact one (damaged: %s)", step,
                    ", ".join(str(s) for s, _ in damaged))
      return step, state, extra
    if damaged:
      raise NoIntactCheckpointError(
          f"no checkpoint in {self.directory} can be restored: "
          + "; ".join(f"step {s}: {why}" for s, why in damaged)
          + ". Restore the directory from a backup, or move it away to start from scratch")
    return 0, abstract_state, None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps into `<workdir>/checkpoints.damaged/<step>[.N]` (process 0; the
    others wait), so the run can save those steps again and the evidence is kept."""
    if jax.process_index() == 0:
      target_root = self.directory.parent / DAMAGED_DIR
      target_root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, n = target_root / str(step), 0
        while target.exists():
          n += 1
          target = target_root / f"{step}.{n}"
        (self.directory / str(step)).rename(target)
        log.warning("moved damaged checkpoint %d to %s", step, target)
    distributed.barrier("checkpoint_set_aside")
    self._manager.reload()

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Any:
    """Restores `step` into `abstract_state`'s shapes/shardings and rewinds `data_iterator`
    (re-sharding its state when the step was saved by another number of processes)."""
    return self._restore(step, abstract_state, data_iterator, None)[0]

  def _restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator,
               abstract_extra: Any) -> tuple[Any, Any]:
    """`restore`, plus the task's own state saved with `step` (restored into `abstract_extra`;
    None when not asked for or not saved), all in one Orbax call."""
    self._check_metadata(step)
    data_state = self._resharded_data_state(step)
    on_disk, frozen = self._on_disk(abstract_state)
    items = {"state": ocp.args.StandardRestore(_abstract(on_disk))}
    if data_state is None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if abstract_extra is not None and (self.directory / str(step) / TASK_ITEM).exists():
      items[TASK_ITEM] = ocp.args.StandardRestore(_abstract(abstract_extra))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_state is not None:
      data_iterator.set_state(data_state)
    log.info("restored checkpoint %d from %s", step, self.directory)
    state = restored["state"]
    if frozen is not None:  # the frozen base comes from `abstract_state` (rebuilt from config)
      state = state.replace(params=nnx.merge_state(state.params, frozen))
    return state, restored[TASK_ITEM] if TASK_ITEM in items else None

  def _on_disk(self, state: Any) -> tuple[Any, Any]:
    """(what is saved of the train state, the params that are not: None when all are)."""
    if self.saved_params is None:
      return state, None
    saved, frozen = nnx.split_state(state.params, self.saved_params, ...)
    return state.replace(params=saved), frozen

  def _resharded_data_state(self, step: int) -> dict[str, Any] | None:
    """None when `step`'s data iterator state was saved by this run's process count (Grain
    restores it); else the one state every saved process holds, for this run's processes.

    Every process of a run holds the same batch index (each reads its own rows of the same
    global batch, `data.pipeline.process_batches`), so the saved files agree and the state maps
    onto any process count. `ProcessCountError` when they do not (a one-line what-to-do).
    """
    directory = self.directory / str(step) / "data"
    files = {}
    for path in directory.iterdir():
      match = _DATA_FILE.fullmatch(path.name)
      if match:
        files[int(match[1]), int(match[2])] = path
    counts = {count for _, count in files}
    if counts == {jax.process_count()} or not files:
      return None  # Grain's own restore (which names a missing file)
    saved = max(counts)
    states = [files[i, saved].read_text() for i in range(saved) if (i, saved) in files]
    parsed = [json.loads(text) for text in states]
    if len(parsed) != saved or any(p != parsed[0] for p in parsed):
      raise ProcessCountError(
          f"checkpoint {self.directory / str(step)} was saved by {saved} processes and this run "
          f"has {jax.process_count()}, but the saved data iterator states differ (or some are "
          f"missing) so they cannot be re-sharded; resume with {saved} processes "
          f"(distributed.num_processes={saved}), or start a new workdir from its params with "
          f"init_from={self.directory.parent}@{step}")
    log.warning("checkpoint %d was saved by %d processes and this run has %d: the data iterator "
                "state (%s) is re-sharded; batches continue exactly", step, saved,
                jax.process_count(), parsed[0])
    return parsed[0]

  def step_metadata(self, step: int) -> dict[str, Any]:
    """The `metadata` saved with `step` ({} for a checkpoint written without)."""
    meta = self._manager.metadata(step)
    return dict(getattr(meta, "custom_metadata", None) or {})

  def _check_metadata(self, step: int) -> None:
    """A checkpoint of adapters only restores onto the base it was trained on."""
    saved = self.step_metadata(step)
    for key in sorted(set(saved) | set(self.metadata)):
      if saved.get(key) != self.metadata.get(key):
        raise ConfigError(
            f"checkpoint {self.directory / str(step)} was saved with {key}={saved.get(key)!r} "
            f"but this run has {key}={self.metadata.get(key)!r}; resume with the config it was "
            "trained with (model.lora.*, init_from, model.hf_path, model.preset, seed)")

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    if self._write_error is not None:
      return
    with self._write_errors(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and closes; a write error is raised once (`CheckpointWriteError`),
    and after one, closing only cleans up."""
    if self._write_error is not None:
      try:
        self._manager.close()
      except Exception as e:  # noqa: BLE001  (already reported)
        log.debug("closing after a failed write: %s", e)
      return
    try:
      with self._write_errors(None):
        self._manager.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except OSError as e:
        if self._write_error is None:
          raise
        log.debug("closing after a failed write: %s", e)


__all__ = ["CheckpointWriteError", "Checkpointer", "DAMAGED_DIR", "FAULT_KILL_AT_SAVE",
           "NoIntactCheckpointError", "ProcessCountError", "TASK_ITEM", "finalized_steps"]
