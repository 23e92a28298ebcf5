"""Training: one loop (`loop.train`) and the tasks it runs by name (`loop.TASKS`).

`scripts/train.py` wraps `recllm_jax.train.loop.train(config)`. A task (`task.Task`) owns its
data, its step and its evaluation: `sft.SftTask` (one jitted update per batch) and
`grpo.GrpoTask` (rollout, host rewards, group advantages, mu updates). The loop owns the mesh,
model, optimizer, checkpoints, metrics, the NaN guard and signals.
"""

from recllm_jax.train.build import load_checkpoint
from recllm_jax.train.loop import TASKS, NonFiniteLossError, train
from recllm_jax.train.task import Run, Task, Work
from recllm_jax.train.optim import TrainState, make_optimizer, make_schedule, make_train_step
from recllm_jax.train.sft import SftTask, sft_loss

__all__ = ["NonFiniteLossError", "Run", "SftTask", "TASKS", "Task", "TrainState", "Work", "load_checkpoint",
           "make_optimizer", "make_schedule", "make_train_step", "sft_loss", "train"]
