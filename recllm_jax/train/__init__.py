"""Training: the shared loop, optimizer/step, checkpoints and metrics, plus the SFT task.

`recllm_jax.train.loop.train(config)` is the entry point (`scripts/train.py` wraps it). A task
(`loop.Task`: tokenizer, data iterators and a summed loss) is all a new trainer has to add.
"""

from recllm_jax.train.loop import NonFiniteLossError, Task, train
from recllm_jax.train.optim import TrainState, make_optimizer, make_schedule, make_train_step
from recllm_jax.train.sft import SftTask, sft_loss

__all__ = ["NonFiniteLossError", "SftTask", "Task", "TrainState", "make_optimizer",
           "make_schedule", "make_train_step", "sft_loss", "train"]
