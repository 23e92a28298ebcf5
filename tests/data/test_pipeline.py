"""Grain SFT pipeline: tokenization, masks, truncation, buckets, order, resume, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from recllm_jax import sharding
from recllm_jax.data import pipeline as pl
from recllm_jax.data.errors import DataError

EOS, PAD = 1, 0


class CharTokenizer:
  """One token per character (ids >= 2), so expected ids are easy to write down."""

  eos_token_id = EOS
  pad_token_id = PAD

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return [ord(c) - ord("a") + 2 for c in text]


def ids(text: str) -> list[int]:
  return CharTokenizer().encode(text)


def test_tokenize_appends_eos_and_marks_completion():
  ex = pl.tokenize_example("abc", "de", CharTokenizer(), max_length=16)
  assert ex.tokens.tolist() == ids("abc") + ids("de") + [EOS]
  assert ex.completion_start == 3


def test_truncation_cuts_prompt_from_the_left_and_keeps_completion():
  # max_length 6 inputs -> 7 tokens: completion "xy"+eos (3) keeps the last 4 prompt tokens.
  ex = pl.tokenize_example("abcdefgh", "xy", CharTokenizer(), max_length=6)
  assert ex.tokens.tolist() == ids("efgh") + ids("xy") + [EOS]
  assert ex.completion_start == 4
  # A completion longer than the budget keeps one prompt token and the completion's start.
  ex = pl.tokenize_example("abc", "qrstuvwxyz", CharTokenizer(), max_length=4)
  assert ex.tokens.tolist() == ids("c") + ids("qrst")


def test_collate_shifts_targets_masks_completion_and_pads_to_bucket():
  exs = [pl.tokenize_example("abc", "d", CharTokenizer(), 32),
         pl.tokenize_example("ab", "cde", CharTokenizer(), 32)]
  batch = pl.collate(exs, buckets=(4, 8, 16), pad_id=PAD)
  assert batch["input_ids"].shape == (2, 8)  # longest has 5 inputs -> bucket 8
  a, b, c, d, e = ids("abcde")
  np.testing.assert_array_equal(batch["input_ids"][0], [a, b, c, d, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["targets"][0], [b, c, d, EOS, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["attention_mask"][0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["targets"][1], [b, c, d, e, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 1, 1, 1, 0, 0, 0])


def test_bucket_lengths():
  assert pl.bucket_lengths(1024) == (256, 512, 768, 1024)
  assert pl.bucket_lengths(100, 4) == (32, 64, 80, 100)
  assert pl.bucket_lengths(64, 1) == (64,)


EXAMPLES = [(f"prompt{i:02d}" + "z" * (i % 5), f"c{i}") for i in range(12)]


def make_ds(**kw):
  cfg = pl.PipelineConfig(**{"batch_size": 4, "max_length": 32, "seed": 7, **kw})
  return pl.train_dataset(EXAMPLES, lambda e: e, CharTokenizer(), cfg)


def first_ids(batch) -> list[int]:
  """Which example each row is (encoded in the prompt's digits)."""
  return [int("".join(chr(t + ord("a") - 2) for t in row[6:8])) for row in batch["input_ids"]]


def test_each_epoch_is_a_fresh_permutation_of_all_examples():
  it = pl.make_iterator(make_ds())
  epoch1 = sum((first_ids(next(it)) for _ in range(3)), [])
  epoch2 = sum((first_ids(next(it)) for _ in range(3)), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(12))
  assert epoch1 != epoch2 and epoch1 != list(range(12))


def test_order_depends_only_on_seed():
  a, b = pl.make_iterator(make_ds()), pl.make_iterator(make_ds())
  c = pl.make_iterator(make_ds(seed=8))
  assert first_ids(next(a)) == first_ids(next(b)) != first_ids(next(c))


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_resumes_exactly(threads):
  it = pl.make_iterator(make_ds(), threads)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pl.make_iterator(make_ds(), threads)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in pl.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_dataset_pads_last_batch_with_zero_weight_rows():
  cfg = pl.PipelineConfig(batch_size=5, max_length=32)
  batches = list(pl.eval_dataset(EXAMPLES, lambda e: e, CharTokenizer(), cfg))
  assert len(batches) == 3 and all(b["input_ids"].shape[0] == 5 for b in batches)
  assert batches[-1]["loss_mask"][2:].sum() == 0 and batches[-1]["loss_mask"][:2].sum() > 0
  assert len(list(pl.eval_dataset(EXAMPLES, lambda e: e, CharTokenizer(), cfg, 1))) == 1


def test_empty_dataset_is_a_data_error():
  with pytest.raises(DataError, match="empty"):
    pl.train_dataset([], lambda e: e, CharTokenizer(), pl.PipelineConfig(4, 32))


def test_fewer_examples_than_a_batch_is_a_data_error_for_finite_epochs():
  with pytest.raises(DataError, match="less than one batch"):
    pl.train_dataset(EXAMPLES[:2], lambda e: e, CharTokenizer(),
                     pl.PipelineConfig(4, 32, num_epochs=1))


def test_to_global_shards_batch_over_data_and_fsdp():
  mesh = sharding.make_mesh(data=2, fsdp=-1)
  batch = next(pl.make_iterator(make_ds(batch_size=8)))
  arrays = pl.to_global(batch, mesh)
  x = arrays["input_ids"]
  assert x.shape == batch["input_ids"].shape
  assert len(x.addressable_shards) == jax.device_count()
  assert x.addressable_shards[0].data.shape[0] == 8 // jax.device_count()
  np.testing.assert_array_equal(np.asarray(x), batch["input_ids"])
