"""Grain input pipeline: examples -> tokenized, masked, bucketed batches on the device mesh.

The pipeline is a `grain.MapDataset` so that every batch is a pure function of
`(seed, step)`: `shuffle` reshuffles each epoch deterministically, `repeat` runs
epochs back to back (batches span epoch boundaries, so no example is dropped by
`drop_remainder` except at the very end), and the iterator state is a single
integer that the checkpoint saves. A resumed run therefore sees exactly the
batches an uninterrupted run would have seen.

Each example becomes `prompt ids + completion ids + eos`. Only completion and
eos tokens are trained on (`loss_mask`). Long sequences lose prompt tokens from
the left (the oldest history), never completion tokens. Batches are padded on
the right to the smallest of a few bucket lengths, so `jit` compiles one
program per bucket instead of one per length.

Batch layout (all `[B, T]`, T a bucket length):
  input_ids       int32  tokens fed to the model (padded with `pad_id`)
  attention_mask  int32  1 on real tokens
  targets         int32  next token at every position (`input_ids` shifted left)
  loss_mask       float32 1 where `targets` is a completion/eos token
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recllm_jax.data.errors import DataError

Batch = dict[str, np.ndarray]
# example -> (prompt_text, completion_text); the completion has no eos.
FormatFn = Callable[[Any], tuple[str, str]]

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask")


class Tokenizer(Protocol):
  """The part of a `transformers` tokenizer the pipeline uses."""

  eos_token_id: int | None
  pad_token_id: int | None

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """`tokens[:-1]` are inputs and `tokens[1:]` targets; `completion_start` indexes `tokens`."""

  tokens: np.ndarray  # int32 [L]
  completion_start: int


def bucket_lengths(max_length: int, num_buckets: int = 4, multiple: int = 16) -> tuple[int, ...]:
  """`num_buckets` evenly spaced lengths up to `max_length`, rounded up to `multiple`."""
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  lengths = {min(max_length, -(-max_length * (i + 1) // num_buckets // multiple) * multiple)
             for i in range(num_buckets)}
  return tuple(sorted(lengths))


def tokenize_example(prompt: str, completion: str, tokenizer: Tokenizer,
                     max_length: int) -> TokenizedExample:
  """`prompt + completion + eos`, at most `max_length + 1` tokens (inputs+1 target).

  The prompt is cut from the left: its start holds the oldest history, the least useful
  context. The completion is what we learn from, so it is kept whole; only if it alone exceeds
  the budget is its tail cut (the eos is then lost, which the caller sees in `num_truncated`).
  """
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos token; SFT completions must end with eos")
  prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
  completion_ids = tokenizer.encode(completion, add_special_tokens=False)
  completion_ids = completion_ids + [tokenizer.eos_token_id]
  budget = max_length + 1
  completion_ids = completion_ids[:budget - 1] if len(completion_ids) >= budget else completion_ids
  keep_prompt = max(1, budget - len(completion_ids))
  prompt_ids = prompt_ids[-keep_prompt:] if prompt_ids else []
  if not prompt_ids:
    raise DataError("empty prompt: there is no token to predict the first completion token from")
  tokens = np.asarray(prompt_ids + completion_ids, np.int32)
  return TokenizedExample(tokens=tokens, completion_start=len(prompt_ids))


def collate(examples: Sequence[TokenizedExample], buckets: Sequence[int], pad_id: int) -> Batch:
  """Pads a list of examples (right padding) to the smallest bucket that fits them all."""
  longest = max(len(e.tokens) - 1 for e in examples)
  length = next((b for b in buckets if b >= longest), None)
  if length is None:
    raise ValueError(f"sequence of {longest} inputs exceeds the largest bucket {buckets[-1]}")
  batch = {
      "input_ids": np.full((len(examples), length), pad_id, np.int32),
      "attention_mask": np.zeros((len(examples), length), np.int32),
      "targets": np.full((len(examples), length), pad_id, np.int32),
      "loss_mask": np.zeros((len(examples), length), np.float32),
  }
  for row, ex in enumerate(examples):
    n = len(ex.tokens) - 1
    batch["input_ids"][row, :n] = ex.tokens[:-1]
    batch["attention_mask"][row, :n] = 1
    batch["targets"][row, :n] = ex.tokens[1:]
    # targets[i] = tokens[i + 1]: completion targets start at position completion_start - 1.
    batch["loss_mask"][row, ex.completion_start - 1:n] = 1.0
  return batch


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Shapes and order of the batches. `batch_size` is global (summed over processes)."""

  batch_size: int
  max_length: int
  num_buckets: int = 4
  seed: int = 0
  num_epochs: int | None = None  # None = repeat forever
  prefetch_threads: int = 0  # grain read threads; 0 = read in the training thread

  @property
  def buckets(self) -> tuple[int, ...]:
    return bucket_lengths(self.max_length, self.num_buckets)


def _process_batch_size(batch_size: int) -> int:
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch_size={batch_size} is not divisible by {count} processes")
  return batch_size // count


def _tokenized(examples: Sequence[Any], format_fn: FormatFn, tokenizer: Tokenizer,
               max_length: int) -> tuple[grain.MapDataset, Callable[[Any], TokenizedExample]]:
  """This process's slice of `examples` and the function that tokenizes one of them."""
  if not examples:
    raise DataError("no examples: the dataset split is empty")
  ds = grain.MapDataset.source(list(examples))
  # Each process reads a disjoint, equally long slice (a ragged tail would desync hosts).
  count = jax.process_count()
  per_process = len(examples) // count
  if per_process == 0:
    raise DataError(f"{len(examples)} examples cannot feed {count} processes")
  ds = ds[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]

  def tokenize(example: Any) -> TokenizedExample:
    prompt, completion = format_fn(example)
    return tokenize_example(prompt, completion, tokenizer, max_length)

  return ds, tokenize


def train_dataset(examples: Sequence[Any], format_fn: FormatFn, tokenizer: Tokenizer,
                  cfg: PipelineConfig) -> grain.MapDataset:
  """Shuffled, repeated, tokenized, bucketed training batches (numpy, this process's rows)."""
  ds, tokenize = _tokenized(examples, format_fn, tokenizer, cfg.max_length)
  batch_size = _process_batch_size(cfg.batch_size)
  if len(ds) < batch_size and cfg.num_epochs is not None:
    raise DataError(f"{len(ds)} training examples per process is less than one batch of "
                    f"{batch_size}; lower train.batch_size")
  pad_id = _pad_id(tokenizer)
  buckets = cfg.buckets
  return (ds.shuffle(seed=cfg.seed)
          .repeat(cfg.num_epochs)
          .map(tokenize)
          .batch(batch_size, drop_remainder=True,
                 batch_fn=lambda exs: collate(exs, buckets, pad_id)))


def eval_dataset(examples: Sequence[Any], format_fn: FormatFn, tokenizer: Tokenizer,
                 cfg: PipelineConfig, max_batches: int | None = None) -> grain.MapDataset:
  """Unshuffled eval batches. The last batch is padded with all-masked rows (zero weight)."""
  ds, tokenize = _tokenized(examples, format_fn, tokenizer, cfg.max_length)
  batch_size = _process_batch_size(cfg.batch_size)
  if max_batches is not None:
    ds = ds[:max_batches * batch_size]
  pad_id = _pad_id(tokenizer)
  buckets = cfg.buckets

  def collate_full(exs: Sequence[TokenizedExample]) -> Batch:
    batch = collate(exs, buckets, pad_id)
    missing = batch_size - len(exs)
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()} if missing else batch

  return ds.map(tokenize).batch(batch_size, drop_remainder=False, batch_fn=collate_full)


def make_iterator(ds: grain.MapDataset, prefetch_threads: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state`/`set_state`).

  With `prefetch_threads` > 0, Grain tokenizes and collates that many elements ahead in
  background threads; 0 reads synchronously (deterministic timing, for tests and debugging).
  The iterator state counts consumed batches either way, so resuming is unaffected.
  """
  options = grain.ReadOptions(num_threads=prefetch_threads,
                              prefetch_buffer_size=2 * prefetch_threads)
  return iter(ds.to_iter_dataset(options))


def _pad_id(tokenizer: Tokenizer) -> int:
  pad = tokenizer.pad_token_id
  return tokenizer.eos_token_id if pad is None else pad


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim over (`data`, `fsdp`), everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over the mesh's batch axes.

  Only process-local data is touched, so this is also correct with many hosts.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def num_tokens(batch: Batch) -> int:
  """Real (non-padding) input tokens: what tokens/s counts."""
  return int(np.asarray(batch["attention_mask"]).sum())


__all__ = [
    "BATCH_KEYS", "Batch", "FormatFn", "PipelineConfig", "TokenizedExample", "batch_sharding",
    "bucket_lengths", "collate", "eval_dataset", "make_iterator", "num_tokens",
    "to_global", "tokenize_example", "train_dataset",
]
