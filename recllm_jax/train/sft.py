"""Supervised fine-tuning: completion-only token cross-entropy and the SFT task.

The loss is split into `sft_loss_terms` (sum and token count) and `sft_loss` (their ratio) so
the generic update step can normalise by the token count of the *whole* batch: with gradient
accumulation every completion token then has the same weight as in one big batch, instead of
each micro-batch's mean getting the same weight.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections

from recllm_jax.data import pipeline
from recllm_jax.data.errors import DataError

log = logging.getLogger(__name__)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, T, V] logits, [B, T] int targets -> [B, T] -log p(target), computed in fp32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit


def sft_loss_terms(logits: jax.Array, targets: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token CE, number of unmasked tokens)."""
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean token cross-entropy over completion tokens (0 if the mask is empty)."""
  total, count = sft_loss_terms(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0)


def sft_loss_fn(model: Any, batch: Mapping[str, jax.Array],
                rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`optim.LossFn` for SFT batches (see `recllm_jax.data.pipeline` for the layout)."""
  del rng  # SFT is deterministic.
  logits = model(batch["input_ids"], batch["attention_mask"])
  total, count = sft_loss_terms(logits, batch["targets"], batch["loss_mask"])
  return total, count, {}


# --- the task --------------------------------------------------------------------------------


def _load_tokenizer(config: ml_collections.ConfigDict, workdir: Path, catalog: Any):
  """The HF checkpoint's tokenizer, an explicit one, or a BPE trained on the catalog texts.

  A trained tokenizer is saved in the workdir and reloaded on resume, so token ids never change
  under a checkpoint.
  """
  import transformers  # heavy; only needed here

  path = config.model.get("tokenizer_path") or config.model.hf_path
  if path:
    return transformers.AutoTokenizer.from_pretrained(path)
  local = workdir / "tokenizer"
  if (local / "tokenizer.json").exists():
    return transformers.AutoTokenizer.from_pretrained(local)
  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  texts = [item.title for item in catalog] + [
      str(v) for item in catalog for v in item.attributes.values() if isinstance(v, str)]
  log.info("training a %d-token BPE tokenizer on %d catalog texts -> %s",
           config.model.tokenizer_vocab_size, len(texts), local)
  return train_bpe_tokenizer(texts, local, vocab_size=config.model.tokenizer_vocab_size)


def data_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  """`data.dir`, or `<workdir>/data` for generated synthetic data."""
  if config.data.dir:
    return Path(config.data.dir)
  if config.data.format == "synthetic":
    return workdir / "data"
  raise DataError(f"data.dir is empty; set --config.data.dir (format={config.data.format!r})")


class SftTask:
  """Tokenizer, data pipelines and loss for SFT; the train loop does the rest.

  Attributes:
    tokenizer: a `transformers` tokenizer (prompt chat template + eos/pad tokens).
    dataset: the loaded `RecDataset`.
    loss_fn: `optim.LossFn`.
  """

  name = "sft"
  loss_fn = staticmethod(sft_loss_fn)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    from recllm_jax.data.prompts import PromptConfig, build_sft_pair
    from recllm_jax.data.sources import load_dataset

    workdir = Path(workdir)
    self.config = config
    self.dataset = load_dataset(data_dir(config, workdir), config.data.format,
                                on_bad_data=config.data.on_bad_data, seed=config.seed)
    if self.dataset.skipped:
      log.warning("skipped %d bad data rows (data.on_bad_data='skip')", self.dataset.skipped)
    self.tokenizer = _load_tokenizer(config, workdir, self.dataset.catalog)
    prompt_cfg = PromptConfig(**config.data.prompt.to_dict())
    catalog, tokenizer = self.dataset.catalog, self.tokenizer
    self._format = lambda ex: build_sft_pair(ex, catalog, tokenizer, prompt_cfg)
    self.pipeline_config = pipeline.PipelineConfig(
        batch_size=config.train.batch_size, max_length=config.data.max_length,
        num_buckets=config.data.num_buckets, seed=config.seed,
        prefetch_threads=config.data.prefetch_threads)

  def train_iterator(self) -> grain.DatasetIterator:
    ds = pipeline.train_dataset(self.dataset.train, self._format, self.tokenizer,
                                self.pipeline_config)
    return pipeline.make_iterator(ds, self.pipeline_config.prefetch_threads)

  def eval_batches(self) -> Iterator[pipeline.Batch]:
    """Validation batches (at most `train.eval_batches`); empty if there is no valid split."""
    if not self.dataset.valid:
      return iter(())
    return iter(pipeline.eval_dataset(self.dataset.valid, self._format, self.tokenizer,
                                      self.pipeline_config, self.config.train.eval_batches))


__all__ = ["SftTask", "data_dir", "sft_loss", "sft_loss_fn", "sft_loss_terms",
           "token_cross_entropy"]
