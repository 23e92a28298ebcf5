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
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from recllm_jax import paths
from recllm_jax.errors import ConfigError

log = logging.getLogger(__name__)

TASK_ITEM = "task"  # the optional item holding a task's own state (`Task.extra_state`)


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           force: bool = False, extra: Any = None) -> bool:
    """Starts an (async) save; returns whether one was started (interval or `force`).
    `extra`: the task's own state (a pytree of arrays), saved as the `task` item if given."""
    due = self.every > 0 and step % self.every == 0
    if not (force or due) or step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(self._on_disk(state)[0]),
             "data": grain.checkpoint.CheckpointSave(data_iterator)}
    if extra is not None:
      items[TASK_ITEM] = ocp.args.StandardSave(extra)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force,
                               custom_metadata=self.metadata or None)
    if saved:
      log.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Any:
    """Restores `step` into `abstract_state`'s shapes/shardings and rewinds `data_iterator`."""
    self._check_metadata(step)
    on_disk, frozen = self._on_disk(abstract_state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), on_disk)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    log.info("restored checkpoint %d from %s", step, self.directory)
    state = restored["state"]
    if frozen is not None:  # the frozen base comes from `abstract_state` (rebuilt from config)
      state = state.replace(params=nnx.merge_state(state.params, frozen))
    return state

  def _on_disk(self, state: Any) -> tuple[Any, Any]:
    """(what is saved of the train state, the params that are not: None when all are)."""
    if self.saved_params is None:
      return state, None
    saved, frozen = nnx.split_state(state.params, self.saved_params, ...)
    return state.replace(params=saved), frozen

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

  def restore_extra(self, step: int, abstract_extra: Any) -> Any | None:
    """The task's own state saved with `step` (restored into `abstract_extra`'s shapes and
    shardings), or None when that checkpoint has none."""
    if not (self.directory / str(step) / TASK_ITEM).exists():
      return None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_extra)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{TASK_ITEM: ocp.args.StandardRestore(abstract)}))
    return restored[TASK_ITEM]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


__all__ = ["Checkpointer", "TASK_ITEM"]
