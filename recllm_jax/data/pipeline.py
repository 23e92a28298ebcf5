"""Grain input pipeline: examples -> tokenized, masked, bucketed batches on the device mesh.

The pipeline is a `grain.MapDataset` so that every batch is a pure function of
`(seed, step)`: `shuffle` reshuffles each epoch deterministically, `repeat` runs
epochs back to back (batches span epoch boundaries, so no example is dropped by
`drop_remainder` except at the very end), and the iterator state is a single
integer that the checkpoint saves. A resumed run therefore sees exactly the
batches an uninterrupted run would have seen. Batches do not depend on the number of processes
either: each process reads only its contiguous block of rows of every global batch
(`process_batches`), and `to_global` assembles the blocks into global arrays.

Each example becomes `prompt ids + completion ids + eos`, the prompt encoded by
`tokenizer.encode_prompt` (exactly one BOS). Only completion and eos tokens are
trained on (`loss_mask`). Sequences fit `max_length` because the format function
budgets the prompt's *history* (`prompts.build_sft_pair(..., max_length=...)`); the
pipeline never cuts a prompt (that would remove the BOS and the template header), and
only cuts a completion's tail when the shortest prompt leaves too little room (its
eos is then lost). Both events are counted per row (`STAT_KEYS`) so the train loop
can log them. Batches are padded on the right to the smallest of a few bucket lengths
(`buckets.linear_buckets`), so `jit` compiles one program per bucket instead of one
per length.

Batch layout (`[B, T]`, T a bucket length), sent to the devices:
  input_ids          int32   tokens fed to the model (padded with `pad_id`)
  attention_mask     int32   1 on real tokens
  targets            int32   next token at every position (`input_ids` shifted left)
  loss_mask          float32 1 where `targets` is a completion/eos token (or, with
                     `history_loss`, a token of a history item after the first)
Host-only per-row statistics (`[B]` int32; `split_stats` removes them, `to_global` skips them):
  history_truncated  1 if the prompt shows fewer history items than the example has
  eos_lost           1 if the completion was cut, so its eos is not trained
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recllm_jax import buckets as buckets_lib
from recllm_jax import distributed
from recllm_jax.data.errors import DataError
from recllm_jax.errors import ConfigError
from recllm_jax.data.prompts import SftPair
from recllm_jax.data.tokenizer import Tokenizer, encode_prompt

Batch = dict[str, np.ndarray]
# example -> its prompt and completion text (the completion has no eos).
FormatFn = Callable[[Any], SftPair]

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask")
STAT_KEYS = ("history_truncated", "eos_lost")

# The padded lengths of right-padded training sequences (the policy lives in `recllm_jax.buckets`).
bucket_lengths = buckets_lib.linear_buckets


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """`tokens[:-1]` are inputs and `tokens[1:]` targets; `completion_start` indexes `tokens`.

  A prompt-only example (for GRPO previews) has `completion_start == len(tokens)`.
  """

  tokens: np.ndarray  # int32 [L]
  completion_start: int
  history_truncated: bool = False
  eos_lost: bool = False
  # Prompt positions (indices into `tokens`) also trained on: history items (`history_loss`).
  prompt_targets: tuple[int, ...] = ()


def span_positions(tokenizer: Tokenizer, prompt: str, prompt_ids: Sequence[int],
                   spans: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  """Indices into `prompt_ids` of the tokens inside the character `spans` of `prompt`.

  Uses the fast tokenizer's offsets; `prompt_ids` may start with a BOS that `encode_prompt`
  prepended (offsets are then shifted by one token).
  """
  enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
  shift = len(prompt_ids) - len(enc["input_ids"])
  if shift not in (0, 1) or list(prompt_ids[shift:]) != list(enc["input_ids"]):
    raise ValueError("the prompt's offsets do not match its token ids (encode_prompt changed?)")
  out = []
  for t, (a, b) in enumerate(enc["offset_mapping"]):
    if b > a and any(lo <= a and b <= hi for lo, hi in spans):
      out.append(t + shift)
  return tuple(out)


def tokenize_example(pair: SftPair, tokenizer: Tokenizer, max_length: int) -> TokenizedExample:
  """`prompt + completion + eos`, at most `max_length + 1` tokens (inputs + 1 target).

  The prompt is kept whole. If the completion does not fit after it, its tail is cut
  (`eos_lost`); a prompt that leaves no room for a single completion token is a `DataError`.
  """
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos token; SFT completions must end with eos")
  prompt_ids = encode_prompt(tokenizer, pair.prompt)
  if not prompt_ids:
    raise DataError("empty prompt: there is no token to predict the first completion token from")
  room = max_length + 1 - len(prompt_ids)
  if room < 1:
    raise DataError(
        f"a prompt of {len(prompt_ids)} tokens (showing {pair.history_kept} of "
        f"{pair.history_total} history items) leaves no room for the completion within "
        f"data.max_length={max_length}; raise data.max_length or shorten the prompt template")
  completion_ids = tokenizer.encode(pair.completion, add_special_tokens=False)
  completion_ids = [*completion_ids, tokenizer.eos_token_id]
  tokens = np.asarray(prompt_ids + completion_ids[:room], np.int32)
  prompt_targets = (span_positions(tokenizer, pair.prompt, prompt_ids, pair.history_spans)
                    if pair.history_spans else ())
  return TokenizedExample(tokens=tokens, completion_start=len(prompt_ids),
                          history_truncated=pair.history_truncated,
                          eos_lost=len(completion_ids) > room, prompt_targets=prompt_targets)


def collate(examples: Sequence[TokenizedExample], buckets: Sequence[int], pad_id: int) -> Batch:
  """Pads a list of examples (right padding) to the smallest bucket that fits them all."""
  length = buckets_lib.smallest_bucket(buckets, max(len(e.tokens) - 1 for e in examples))
  rows = len(examples)
  batch = {
      "input_ids": np.full((rows, length), pad_id, np.int32),
      "attention_mask": np.zeros((rows, length), np.int32),
      "targets": np.full((rows, length), pad_id, np.int32),
      "loss_mask": np.zeros((rows, length), np.float32),
      "history_truncated": np.asarray([e.history_truncated for e in examples], np.int32),  # [B]
      "eos_lost": np.asarray([e.eos_lost for e in examples], np.int32),  # [B]
  }
  for row, ex in enumerate(examples):
    n = len(ex.tokens) - 1
    batch["input_ids"][row, :n] = ex.tokens[:-1]
    batch["attention_mask"][row, :n] = 1
    batch["targets"][row, :n] = ex.tokens[1:]
    # targets[i] = tokens[i + 1]: completion targets start at position completion_start - 1.
    batch["loss_mask"][row, ex.completion_start - 1:n] = 1.0
    for position in ex.prompt_targets:  # position >= 1: history items after the first
      batch["loss_mask"][row, position - 1] = 1.0
  return batch


def split_stats(batch: Batch) -> tuple[Batch, dict[str, int]]:
  """`(the device part of batch, {stat key: rows with that event})`; `batch` is not modified.

  The counts are over the global batch: with several processes each holds some rows, and the
  counts are summed over them (a collective: every process calls this for every batch).
  """
  stats = distributed.process_sum({k: int(np.sum(batch[k])) for k in STAT_KEYS if k in batch})
  return {k: v for k, v in batch.items() if k not in STAT_KEYS}, stats


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Shapes and order of the batches. `batch_size` is global (summed over processes)."""

  batch_size: int
  max_length: int
  num_buckets: int = 4
  seed: int = 0
  num_epochs: int | None = None  # None = repeat forever
  prefetch_threads: int = 0  # grain read threads; 0 = read in the training thread
  # A random training-time transform of each example (before formatting), seeded per element
  # by `seed` and its position in the repeated stream, so every epoch draws anew and a resumed
  # run draws the same; None = none.
  augment: Callable[[Any, np.random.Generator], Any] | None = None

  @property
  def buckets(self) -> tuple[int, ...]:
    return bucket_lengths(self.max_length, self.num_buckets)


def _process_batch_size(batch_size: int) -> int:
  count = jax.process_count()
  if batch_size % count:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by {count} processes")
  return batch_size // count


def tokenize_fn(format_fn: FormatFn, tokenizer: Tokenizer,
                max_length: int) -> Callable[[Any], TokenizedExample]:
  """example -> `TokenizedExample`, exactly as the datasets tokenize it."""

  def tokenize(example: Any) -> TokenizedExample:
    return tokenize_example(format_fn(example), tokenizer, max_length)

  return tokenize


def source(examples: Sequence[Any]) -> grain.MapDataset:
  """`examples` as a Grain `MapDataset` (every process holds the whole, cheap, example list)."""
  if not examples:
    raise DataError("no examples: the dataset split is empty")
  return grain.MapDataset.source(list(examples))


def process_batches(ds: grain.MapDataset, batch_size: int,
                    batch_fn: Callable[[list[Any]], Any], *,
                    drop_remainder: bool = True) -> grain.MapDataset:
  """This process's share of each global batch of `ds`, one `batch_fn(rows)` per batch.

  Global batch k is `ds[k * B:(k + 1) * B]` (B = `batch_size`, global), exactly what a single
  process would batch, so a run's batches do not depend on how many processes feed it. Of
  P processes, process p gets rows [p * B/P, (p + 1) * B/P) of every global batch and reads
  only those elements (a `MapDataset` is lazy: unread rows are never tokenized). Every process
  yields the same number of batches; with `drop_remainder=False` the last one may be short or
  even empty (`batch_fn([])`) on some processes.
  """
  local = _process_batch_size(batch_size)
  first = jax.process_index() * local
  total = len(ds)
  num_batches = total // batch_size if drop_remainder else -(-total // batch_size)

  def rows(k: int) -> Any:
    start = k * batch_size + first
    return batch_fn([ds[i] for i in range(start, min(start + local, total))])

  return grain.MapDataset.range(num_batches).map(rows)


def train_dataset(examples: Sequence[Any], format_fn: FormatFn, tokenizer: Tokenizer,
                  cfg: PipelineConfig) -> grain.MapDataset:
  """Shuffled, repeated, tokenized, bucketed training batches (numpy, this process's rows).

  Row layout across processes: `process_batches`. Each process pads to the bucket of its own
  rows; `to_global` widens them to the longest process's bucket (the single-process bucket).
  """
  ds = source(examples)
  if len(ds) < cfg.batch_size and cfg.num_epochs is not None:
    raise DataError(f"{len(ds)} training examples is less than one batch of "
                    f"{cfg.batch_size}; lower train.batch_size")
  pad = pad_id(tokenizer)
  buckets = cfg.buckets
  ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  if cfg.augment is not None:
    ds = ds.random_map(cfg.augment, seed=cfg.seed)
  ds = ds.map(tokenize_fn(format_fn, tokenizer, cfg.max_length))
  return process_batches(ds, cfg.batch_size, lambda exs: collate(exs, buckets, pad))


def eval_dataset(examples: Sequence[Any], format_fn: FormatFn, tokenizer: Tokenizer,
                 cfg: PipelineConfig, max_batches: int | None = None) -> grain.MapDataset:
  """Unshuffled eval batches. The last batch is padded with all-masked rows (zero weight)."""
  ds = source(examples)
  if max_batches is not None:
    ds = ds[:max_batches * cfg.batch_size]
  batch_size = _process_batch_size(cfg.batch_size)
  pad = pad_id(tokenizer)
  buckets = cfg.buckets

  def collate_full(exs: Sequence[TokenizedExample]) -> Batch:
    if not exs:  # no row of the last global batch fell to this process: all zero rows
      rows = {k: np.zeros((batch_size, buckets[0]), np.int32) for k in BATCH_KEYS}  # [b, T]
      rows["loss_mask"] = rows["loss_mask"].astype(np.float32)
      return {**rows, **{k: np.zeros(batch_size, np.int32) for k in STAT_KEYS}}
    batch = collate(exs, buckets, pad)
    missing = batch_size - len(exs)
    if not missing:
      return batch
    # Zero rows: no real tokens, no loss, no events. Pads dim 0 of [B, T] and [B] arrays alike.
    return {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}

  ds = ds.map(tokenize_fn(format_fn, tokenizer, cfg.max_length))
  return process_batches(ds, cfg.batch_size, collate_full, drop_remainder=False)


def make_iterator(ds: grain.MapDataset, prefetch_threads: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state`/`set_state`).

  With `prefetch_threads` > 0, Grain tokenizes and collates that many elements ahead in
  background threads; 0 reads synchronously (deterministic timing, for tests and debugging).
  The iterator state counts consumed batches either way, so resuming is unaffected.
  """
  options = grain.ReadOptions(num_threads=prefetch_threads,
                              prefetch_buffer_size=2 * prefetch_threads)
  return iter(ds.to_iter_dataset(options))


def pad_id(tokenizer: Tokenizer) -> int:
  """The padding token: the tokenizer's pad, else its eos (padding is masked out either way)."""
  pad = tokenizer.pad_token_id
  return tokenizer.eos_token_id if pad is None else pad


LOSS_MARKER = "----- loss mask starts: the tokens below are trained -----"


def format_train_examples(examples: Sequence[TokenizedExample], tokenizer: Tokenizer) -> str:
  """Human-readable text of tokenized examples, decoded from their tokens.

  Each example is a header line, the decoded prompt, a `LOSS_MARKER` line where the loss
  mask starts, and the decoded completion (eos included), then a blank line. Special tokens
  are shown, and what is shown is exactly what is trained on, truncation included. A newline
  is added before the marker only when the prompt does not end with one. Prompt-only
  examples (`completion_start == len(tokens)`) have no marker.
  """
  out = []
  for i, ex in enumerate(examples, start=1):
    tokens = [int(t) for t in ex.tokens]
    prompt, completion = tokens[:ex.completion_start], tokens[ex.completion_start:]
    notes = [f"{len(prompt)} prompt tokens"]
    if completion:
      notes.append(f"{len(completion)} trained tokens")
    notes += [name.replace("_", " ") for name in STAT_KEYS if getattr(ex, name)]
    out.append(f"===== example {i} of {len(examples)} ({', '.join(notes)}) =====\n")
    if ex.prompt_targets:
      notes.append(f"{len(ex.prompt_targets)} trained history tokens in [[ ]]")
      out[-1] = f"===== example {i} of {len(examples)} ({', '.join(notes)}) =====\n"
    text = _decode_marked(tokenizer, prompt, set(ex.prompt_targets))
    out.append(text if text.endswith("\n") else text + "\n")
    if completion:
      out.append(LOSS_MARKER + "\n")
      out.append(tokenizer.decode(completion, skip_special_tokens=False) + "\n")
    out.append("\n")
  return "".join(out)


def _decode_marked(tokenizer: Tokenizer, tokens: Sequence[int], marked: set[int]) -> str:
  """`tokens` decoded, each run of `marked` positions wrapped in [[ ]]."""
  if not marked:
    return tokenizer.decode(tokens, skip_special_tokens=False)
  parts, start = [], 0
  for i in range(1, len(tokens) + 1):
    if i == len(tokens) or (i in marked) != (start in marked):
      text = tokenizer.decode(tokens[start:i], skip_special_tokens=False)
      parts.append(f"[[{text}]]" if start in marked else text)
      start = i
  return "".join(parts)


def format_prompts(prompts: Sequence[Sequence[int]], tokenizer: Tokenizer) -> str:
  """`format_train_examples` of prompt-only examples (token ids), e.g. GRPO's prompts."""
  return format_train_examples(
      [TokenizedExample(np.asarray(ids, np.int32), completion_start=len(ids)) for ids in prompts],
      tokenizer)


def write_train_examples(path: str | Path, examples: Sequence[TokenizedExample],
                         tokenizer: Tokenizer) -> Path:
  """Writes `format_train_examples(examples, tokenizer)` to `path` (UTF-8) and returns it."""
  path = Path(path)
  path.write_text(format_train_examples(examples, tokenizer), encoding="utf-8")
  return path


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim over (`data`, `fsdp`), everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def pad_columns(batch: Batch, length: int, *, left: bool = False,
                pad_values: dict[str, int] | None = None) -> Batch:
  """Pads every [rows, T] array of `batch` to [rows, length] (`[rows]` arrays are kept).

  Right padding by default (training rows), `left=True` for left-padded prompts. Padding is 0,
  or `pad_values[key]`; callers pad only masked positions, so the value never reaches a loss.
  """
  out = dict(batch)
  for k, v in batch.items():
    if v.ndim == 2 and v.shape[1] < length:
      width = (length - v.shape[1], 0) if left else (0, length - v.shape[1])
      out[k] = np.pad(v, [(0, 0), width], constant_values=(pad_values or {}).get(k, 0))
  return out


def common_length(batch: Batch, *, left: bool = False,
                  pad_values: dict[str, int] | None = None) -> Batch:
  """`batch` padded to the longest T of any process (every process must call it).

  Each process buckets its own rows; a jitted step needs one global shape. The buckets are
  monotone in the longest row, so the largest process bucket is the one a single process
  holding the whole global batch would have chosen.
  """
  lengths = [v.shape[1] for v in batch.values() if v.ndim == 2]
  if not lengths:
    return batch
  return pad_columns(batch, distributed.process_max(max(lengths)), left=left,
                     pad_values=pad_values)


def to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over the mesh's batch axes.

  Host-only statistics (`STAT_KEYS`) are left out. Only process-local data is touched, so
  this is also correct with many hosts; with several, each process's [rows, T] arrays are first
  right-padded to the common T (`common_length`: a collective, every process calls it).
  """
  sharding = batch_sharding(mesh)
  batch = {k: v for k, v in batch.items() if k not in STAT_KEYS}
  if jax.process_count() > 1:
    batch = common_length(batch)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def host_to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from a batch that every process holds in full (identical on all of them).

  Each device takes its own rows of the global batch, wherever the mesh puts it, so the result
  equals the single-process array for any device order (GRPO's rollout rows).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
          for k, v in batch.items() if k not in STAT_KEYS}


def num_tokens(batch: Batch) -> int:
  """Real (non-padding) input tokens: what tokens/s counts."""
  return int(np.asarray(batch["attention_mask"]).sum())


__all__ = [
    "BATCH_KEYS", "Batch", "FormatFn", "LOSS_MARKER", "PipelineConfig", "STAT_KEYS",
    "TokenizedExample", "Tokenizer", "batch_sharding", "bucket_lengths", "collate",
    "common_length", "eval_dataset", "format_prompts", "format_train_examples", "host_to_global",
    "make_iterator", "num_tokens", "pad_columns", "pad_id", "process_batches", "source",
    "split_stats", "to_global", "tokenize_example", "tokenize_fn", "train_dataset",
    "write_train_examples",
]
