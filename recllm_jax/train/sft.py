"""Supervised fine-tuning: completion-only token cross-entropy and the SFT task.

The loss is split into `sft_loss_terms` (sum and token count) and `sft_loss` (their ratio) so
the generic update step can normalise by the token count of the *whole* batch: with gradient
accumulation every completion token then has the same weight as in one big batch, instead of
each micro-batch's mean getting the same weight.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recllm_jax import paths
from recllm_jax.data import pipeline
from recllm_jax.train import build, optim
from recllm_jax.train import metrics as metrics_lib
from recllm_jax.train.task import TRAIN_EXAMPLES_FILE, Work
from recllm_jax.train.logprobs import (DEFAULT_CHUNK_SIZE, model_token_logprobs,
                                       token_logprobs)

log = logging.getLogger(__name__)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, T, V] logits, [B, T] int targets -> [B, T] -log p(target), computed in fp32."""
  return -token_logprobs(logits, targets)


def _masked_terms(token_loss: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, T] per-token loss -> (sum over unmasked tokens, number of unmasked tokens)."""
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_loss * mask), jnp.sum(mask)


def sft_loss_terms(logits: jax.Array, targets: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token CE, number of unmasked tokens), from full [B, T, V] logits."""
  return _masked_terms(token_cross_entropy(logits, targets), loss_mask)


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean token cross-entropy over completion tokens (0 if the mask is empty)."""
  total, count = sft_loss_terms(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0)


def sft_loss_fn(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                logits_chunk_size: int = DEFAULT_CHUNK_SIZE
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`optim.LossFn` for SFT batches (see `recllm_jax.data.pipeline` for the layout).

  The logits are computed `logits_chunk_size` sequence positions at a time
  (`train.logits_chunk_size`; see `train.logprobs`), so the [B, T, V] logits never exist;
  0 computes them all at once.
  """
  # `rng` only drives dropout (`model.dropout`); without it SFT is deterministic.
  logp = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                              batch["targets"], chunk_size=logits_chunk_size,
                              dropout_rng=rng if model.cfg.dropout > 0 else None)  # [B, T]
  total, count = _masked_terms(-logp, batch["loss_mask"])
  return total, count, {}


# --- the task --------------------------------------------------------------------------------


def tokenizer_texts(examples: Sequence[Any], catalog: Any, prompt_cfg: Any,
                    count: int = 256) -> list[str]:
  """Prompt and completion texts of the first `count` examples (plain template), for training
  a tokenizer that knows the prompt wording, not only the catalog."""
  from recllm_jax.data.prompts import build_sft_pair

  pairs = [build_sft_pair(ex, catalog, None, prompt_cfg) for ex in examples[:count]]
  return [t for pair in pairs for t in (pair.prompt, pair.completion)]


def _check_history_spans(examples: Sequence[Any], codec: Any, tokenizer: Any, prompt_cfg: Any,
                         max_length: int, probes: int = 64) -> None:
  """`data.history_loss` must find the history items in the prompt, or it trains nothing.

  Judged on the first example (of `probes` with a history) whose prompt keeps two or more
  history items within `max_length`: only those have history items to train.
  """
  from recllm_jax.data.prompts import build_sft_pair
  from recllm_jax.errors import ConfigError

  with_history = (ex for ex in examples if len(getattr(ex, "history", ())) >= 2)
  for _, example in zip(range(probes), with_history):
    pair = build_sft_pair(example, codec, tokenizer, prompt_cfg, max_length=max_length,
                          history_loss=True)
    if pair.history_kept < 2:
      continue
    if pair.history_spans:
      return
    raise ConfigError(
        "data.history_loss=True, but the prompt does not show the history items verbatim, so "
        "no history token would be trained: data.prompt.history_item_template="
        f"{prompt_cfg.history_item_template!r} must contain {{item}}, and the chat template must "
        "not rewrite the history block")


class SftTask:
  """Tokenizer, data pipelines, loss and step for SFT (`task.Task`); the loop does the rest.

  On start-up, process 0 writes `<workdir>/train_examples.txt`: the first training examples
  exactly as tokenized (prompt, loss-mask boundary, completion), to check the format by eye.

  Attributes:
    tokenizer: a `transformers` tokenizer (prompt chat template + eos/pad tokens).
    dataset: the loaded `RecDataset`.
    loss_fn: `optim.LossFn`.
  """

  name = "sft"
  updates_per_step = 1

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> list[str]:
    """The SFT keys, checked before anything loads; returns the `data.align_tasks` names."""
    from recllm_jax.data.prompts import ALIGN_TASKS
    from recllm_jax.errors import ConfigError

    rate = config.data.get("history_dropout", 0.0)  # absent from configs saved before it existed
    if not 0.0 <= rate < 1.0:
      raise ConfigError(f"data.history_dropout={rate} must be in [0, 1)")
    tasks = [t.strip() for t in config.data.align_tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(ALIGN_TASKS))
    if unknown:
      raise ConfigError(f"data.align_tasks: unknown task(s) {unknown}; expected a comma-separated "
                        f"subset of {list(ALIGN_TASKS)}")
    return tasks

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    from recllm_jax.data.loading import load_run_data
    from recllm_jax.data.prompts import (AlignmentExample, PromptConfig, alignment_examples,
                                         build_alignment_pair, build_sft_pair)
    from recllm_jax.data.schema import Example, drop_history_items, user_sequences

    workdir = paths.workdir_path(workdir)
    self.config = config
    self.loss_fn = functools.partial(sft_loss_fn,
                                     logits_chunk_size=config.train.logits_chunk_size)
    self.dataset, self.codec = load_run_data(config, workdir)
    if self.dataset.skipped:
      log.warning("skipped %d bad data rows (data.on_bad_data='skip')", self.dataset.skipped)
    self.train_examples = self.dataset.train
    if config.data.user_sequences:
      self.train_examples = user_sequences(self.dataset.train)
      log.info("data.user_sequences: %d of %d training examples are users' longest sequences",
               len(self.train_examples), len(self.dataset.train))
    tasks = self.check_config(config)
    if tasks:
      aligned = alignment_examples(self.codec, tasks)
      log.info("data.align_tasks: %d alignment examples (%s) mixed into %d training examples",
               len(aligned), ", ".join(tasks), len(self.train_examples))
      self.train_examples = list(self.train_examples) + aligned
    prompt_cfg = PromptConfig(**config.data.prompt.to_dict())
    # The BPE learns the prompt wording on title prompts; item codes are added tokens.
    self.tokenizer = build.load_tokenizer(
        config, workdir, self.dataset.catalog,
        extra_texts=tokenizer_texts(self.dataset.train, self.dataset.catalog, prompt_cfg),
        new_tokens=self.codec.new_tokens())
    codec, tokenizer = self.codec, self.tokenizer
    max_length, history_loss = config.data.max_length, config.data.history_loss
    if history_loss:
      _check_history_spans(self.train_examples, codec, tokenizer, prompt_cfg, max_length)
    # The history is budgeted so prompt + completion + eos fit max_length (nothing else is cut).
    self._format = lambda ex: (
        build_alignment_pair(ex, codec, tokenizer, prompt_cfg) if isinstance(ex, AlignmentExample)
        else build_sft_pair(ex, codec, tokenizer, prompt_cfg, max_length=max_length,
                            history_loss=history_loss))
    # val_loss stays the loss of the target alone, whatever history_loss trains on.
    self._eval_format = lambda ex: build_sft_pair(ex, codec, tokenizer, prompt_cfg,
                                                  max_length=max_length)
    rate = config.data.get("history_dropout", 0.0)

    def augment(ex: Any, rng: np.random.Generator) -> Any:
      return drop_history_items(ex, rng, rate) if isinstance(ex, Example) else ex

    self.pipeline_config = pipeline.PipelineConfig(
        batch_size=config.train.batch_size, max_length=max_length,
        num_buckets=config.data.num_buckets, seed=config.seed,
        prefetch_threads=config.data.prefetch_threads, augment=augment if rate > 0 else None)
    if jax.process_index() == 0:
      self.write_train_examples(workdir / TRAIN_EXAMPLES_FILE)

  def write_train_examples(self, path: Path, count: int = 8) -> Path:
    """The first `count` training examples as trained on (tokens decoded, loss start marked)."""
    tokenize = pipeline.tokenize_fn(self._format, self.tokenizer, self.pipeline_config.max_length)
    # The first examples, plus the first one of each alignment task (they come last).
    shown = self.train_examples[:count] + [
        next(ex for ex in self.train_examples if getattr(ex, "task", None) == task)
        for task in dict.fromkeys(getattr(ex, "task", None) for ex in self.train_examples)
        if task is not None]
    examples = [tokenize(ex) for ex in shown]
    # Written here, not by `pipeline.write_train_examples`: `path` may be a gs:// epath.Path.
    path.write_text(pipeline.format_train_examples(examples, self.tokenizer), encoding="utf-8")
    return path

  def train_iterator(self) -> grain.DatasetIterator:
    ds = pipeline.train_dataset(self.train_examples, self._format, self.tokenizer,
                                self.pipeline_config)
    return pipeline.make_iterator(ds, self.pipeline_config.prefetch_threads)

  def eval_batches(self) -> Iterator[pipeline.Batch]:
    """Validation batches (at most `train.eval_batches`); empty if there is no valid split."""
    if not self.dataset.valid:
      return iter(())
    return iter(pipeline.eval_dataset(self.dataset.valid, self._eval_format, self.tokenizer,
                                      self.pipeline_config, self.config.train.eval_batches))

  def setup(self, run: Any) -> None:
    """Jits the update (state donated, layout pinned) and the validation loss."""
    self.run = run
    self._update = optim.make_train_step(run.graphdef, run.optimizer, self.loss_fn, run.schedule,
                                         self.config.train.grad_accum_steps, run.state_sharding,
                                         wrt=run.trainable)
    self._eval_step = optim.make_eval_step(run.graphdef, self.loss_fn)

  def step(self, state: optim.TrainState, batch: pipeline.Batch):
    """One update on `batch`; logs the rows whose history was budgeted or whose EOS was cut."""

    batch, stats = pipeline.split_stats(batch)
    state, m = self._update(state, pipeline.to_global(batch, self.run.mesh))
    tokens = pipeline.num_tokens(batch) * jax.process_count()
    flops = tokens * metrics_lib.flops_per_token(self.run.model_cfg, batch["input_ids"].shape[1])
    return state, {**jax.device_get(m), **stats}, Work(tokens=tokens, flops=flops)

  def evaluate(self, state: optim.TrainState) -> dict[str, float]:
    """`val_loss`: the token-weighted mean loss over the validation batches."""
    total, weight = 0.0, 0.0
    for batch in self.eval_batches():
      batch, _ = pipeline.split_stats(batch)
      loss_sum, w = jax.device_get(self._eval_step(state.params,
                                                   pipeline.to_global(batch, self.run.mesh)))
      total, weight = total + float(loss_sum), weight + float(w)
    return {"val_loss": total / weight} if weight else {}


__all__ = ["SftTask", "TRAIN_EXAMPLES_FILE", "sft_loss", "sft_loss_fn", "sft_loss_terms",
           "token_cross_entropy"]
