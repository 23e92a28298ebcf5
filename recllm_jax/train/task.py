"""What a task is to the train loop: `Task` (the protocol), `Run` (what the loop built for it)
and `Work` (what one step did).

Kept apart from `loop` so that tasks depend on this contract only, never on the loop that runs
them (and the loop imports the tasks, not the other way round).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import grain
import jax
import optax
from etils import epath
from flax import nnx

from recllm_jax.data import pipeline
from recllm_jax.models.config import Qwen2Config
from recllm_jax.train import metrics as metrics_lib
from recllm_jax.train import optim

__all__ = ["Run", "TRAIN_EXAMPLES_FILE", "Task", "Work"]

# Every task writes its first examples (as tokenized) here, to check the format by eye.
TRAIN_EXAMPLES_FILE = "train_examples.txt"


@dataclasses.dataclass(frozen=True)
class Work:
  """What a step did, for tokens/s and MFU: trained tokens and model FLOPs (all processes)."""

  tokens: int
  flops: float


@dataclasses.dataclass(frozen=True)
class Run:
  """What the loop built, handed to `Task.setup` before the first step.

  graphdef: the model's NNX graph (`nnx.merge(graphdef, state.params)` gives the model).
  optimizer, schedule: the optax transformation and its LR schedule (over optimizer updates).
  state_sharding: the train state's layout; jitted updates pin their outputs to it.
  initial_params: the params before training or restore (e.g. GRPO's frozen reference).
  trainable: the nnx filter of the params updates differentiate and change (`nnx.LoRAParam`
    for a LoRA run, whose base is frozen; else `nnx.Param`); pass it to `make_train_step`.
  """

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  mesh: jax.sharding.Mesh
  model_cfg: Qwen2Config
  writer: metrics_lib.MetricsWriter
  initial_params: nnx.State
  workdir: epath.Path
  trainable: Any = nnx.Param  # nnx filter of the trained params (`optim.trainable_filter`)

  @property
  def vocab_size(self) -> int:
    return self.model_cfg.vocab_size


class Task(Protocol):
  """What a trainer plugs into the loop.

  `updates_per_step` optimizer updates happen per loop step (the LR schedule counts updates).
  `step` returns the new state, its metrics (at least `loss` and `grad_norm`, for the NaN
  guard) and its `Work`; `evaluate` returns held-out metrics (empty without held-out data).

  Optional: `extra_state()` returns state of the task's own that a resume needs (a pytree of
  arrays, or None for none), saved with every checkpoint; after a restore the loop hands the
  saved value (None if the checkpoint has none) to `restore_extra_state(restored)`.
  """

  name: str
  tokenizer: Any  # a `transformers` tokenizer; the model's vocabulary must cover it
  updates_per_step: int

  @staticmethod
  def check_config(config: Any) -> Any:
    """Raises a `UserError` naming the key for a bad task key; runs before anything loads."""

  def train_iterator(self) -> grain.DatasetIterator: ...

  def setup(self, run: Run) -> None: ...

  def step(self, state: optim.TrainState,
           batch: pipeline.Batch) -> tuple[optim.TrainState, dict[str, Any], Work]: ...

  def evaluate(self, state: optim.TrainState) -> dict[str, float]: ...
