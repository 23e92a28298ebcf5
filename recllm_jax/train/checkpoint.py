"""Orbax checkpoints of the train state and the Grain iterator in `<workdir>/checkpoints`.

Each step directory holds two items: `state` (params, optimizer moments, step, RNG; saved
sharded, restored straight into the current mesh's shardings) and `data` (the Grain
iterator state, one JSON file per process). Saves are asynchronous; Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from recllm_jax import paths
from recllm_jax.errors import ConfigError

log = logging.getLogger(__name__)


class Checkpointer:
  """Keeps the last `keep` checkpoints; `save` every `every` steps (0: only when forced)."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = paths.workdir_path(workdir) / "checkpoints"  # Orbax takes gs:// too
    if every < 0:
      raise ConfigError(f"train.checkpoint_every={every} must be >= 0 (0 = only the final save)")
    # Orbax's own interval is 1: `save` below decides, so every=0 saves only when forced.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           force: bool = False) -> bool:
    """Starts an (async) save; returns whether one was started (interval or `force`)."""
    due = self.every > 0 and step % self.every == 0
    if not (force or due) or step in self._manager.all_steps():
      return False
    saved = self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)
    if saved:
      log.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Any:
    """Restores `step` into `abstract_state`'s shapes/shardings and rewinds `data_iterator`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    log.info("restored checkpoint %d from %s", step, self.directory)
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


__all__ = ["Checkpointer"]
