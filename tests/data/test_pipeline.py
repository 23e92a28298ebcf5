"""Grain SFT pipeline: tokenization, masks, truncation stats, buckets, order, resume, sharding,
the train-examples preview, and the prompt/completion boundary under the real R1 template."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from recllm_jax import sharding
from recllm_jax.data import pipeline as pl
from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError
from recllm_jax.data.prompts import PromptConfig, SftPair, build_sft_pair
from recllm_jax.data.schema import Example

from sample_data import CATALOG_ROWS

EOS, PAD = 1, 0


class CharTokenizer:
  """One token per character (ids >= 2), so expected ids are easy to write down. No BOS."""

  bos_token_id = None
  eos_token_id = EOS
  pad_token_id = PAD

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return [ord(c) - ord("a") + 2 for c in text]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return "".join("<eos>" if i == EOS else chr(i + ord("a") - 2) for i in ids)


def ids(text: str) -> list[int]:
  return CharTokenizer().encode(text)


def tokenize(prompt: str, completion: str, max_length: int, **kw) -> pl.TokenizedExample:
  return pl.tokenize_example(SftPair(prompt, completion, **kw), CharTokenizer(), max_length)


def test_tokenize_appends_eos_and_marks_completion():
  ex = tokenize("abc", "de", max_length=16)
  assert ex.tokens.tolist() == ids("abc") + ids("de") + [EOS]
  assert (ex.completion_start, ex.history_truncated, ex.eos_lost) == (3, False, False)
  assert tokenize("abc", "de", 16, history_kept=2, history_total=5).history_truncated


def test_long_completion_loses_its_tail_never_the_prompt():
  # max_length 5 inputs -> 6 tokens: the prompt (3) stays whole, the completion keeps 3 tokens.
  ex = tokenize("abc", "qrstuvwxyz", max_length=5)
  assert ex.tokens.tolist() == ids("abc") + ids("qrs")
  assert (ex.completion_start, ex.eos_lost) == (3, True)
  # Exactly fitting keeps the eos.
  assert not tokenize("abc", "qr", max_length=5).eos_lost
  with pytest.raises(DataError, match=r"prompt of 6 tokens \(showing 1 of 4 history items\).*max_length=5"):
    tokenize("abcdef", "x", max_length=5, history_kept=1, history_total=4)
  with pytest.raises(DataError, match="empty prompt"):
    tokenize("", "x", max_length=5)


def test_collate_shifts_targets_masks_completion_and_pads_to_bucket():
  exs = [tokenize("abc", "d", 32), tokenize("ab", "cde", 32, history_kept=0, history_total=1),
         tokenize("ab", "cdefghij", 7)]
  batch = pl.collate(exs, buckets=(4, 8, 16), pad_id=PAD)
  assert batch["input_ids"].shape == (3, 8)  # longest has 7 inputs -> bucket 8
  a, b, c, d, e = ids("abcde")
  np.testing.assert_array_equal(batch["input_ids"][0], [a, b, c, d, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["targets"][0], [b, c, d, EOS, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["attention_mask"][0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["targets"][1], [b, c, d, e, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][2], [0, 1, 1, 1, 1, 1, 1, 0])  # no eos target
  np.testing.assert_array_equal(batch["history_truncated"], [0, 1, 0])
  np.testing.assert_array_equal(batch["eos_lost"], [0, 0, 1])
  device, stats = pl.split_stats(batch)
  assert sorted(device) == sorted(pl.BATCH_KEYS) and stats == {"history_truncated": 1, "eos_lost": 1}
  assert set(pl.STAT_KEYS) <= set(batch)  # split_stats does not modify the batch
  with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
    pl.collate(exs, buckets=(4,), pad_id=PAD)


EXAMPLES = [SftPair(f"prompt{i:02d}" + "z" * (i % 5), f"c{i}", i % 3, 2) for i in range(12)]


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
    for k in pl.BATCH_KEYS + pl.STAT_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_dataset_pads_last_batch_with_zero_weight_rows():
  cfg = pl.PipelineConfig(batch_size=5, max_length=32)
  batches = list(pl.eval_dataset(EXAMPLES, lambda e: e, CharTokenizer(), cfg))
  assert len(batches) == 3 and all(b["input_ids"].shape[0] == 5 for b in batches)
  assert batches[-1]["loss_mask"][2:].sum() == 0 and batches[-1]["loss_mask"][:2].sum() > 0
  # Examples 10, 11 (history 1 and 2 of 2) then three padding rows without events.
  np.testing.assert_array_equal(batches[-1]["history_truncated"], [1, 0, 0, 0, 0])
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
  assert sorted(arrays) == sorted(pl.BATCH_KEYS)  # host-only stats stay on the host
  x = arrays["input_ids"]
  assert x.shape == batch["input_ids"].shape
  assert len(x.addressable_shards) == jax.device_count()
  assert x.addressable_shards[0].data.shape[0] == 8 // jax.device_count()
  np.testing.assert_array_equal(np.asarray(x), batch["input_ids"])


def test_format_train_examples_shows_prompt_boundary_completion_and_events():
  exs = [tokenize("abc", "de", 16), tokenize("ab\n", "qrstuvwxyz", 5, history_kept=1, history_total=2),
         pl.TokenizedExample(np.asarray(ids("xyz"), np.int32), completion_start=3)]  # prompt only
  text = pl.format_train_examples(exs, CharTokenizer())
  assert text == (
    "===== example 1 of 3 (3 prompt tokens, 3 trained tokens) =====\n"
    "abc\n"
    f"{pl.LOSS_MARKER}\n"
    "de<eos>\n"
    "\n"
    "===== example 2 of 3 (3 prompt tokens, 3 trained tokens, history truncated, eos lost) =====\n"
    "ab\n"  # the prompt's own newline: none is added before the marker
    f"{pl.LOSS_MARKER}\n"
    "qrs\n"
    "\n"
    "===== example 3 of 3 (3 prompt tokens) =====\n"
    "xyz\n"
    "\n"
  )


def test_format_prompts_is_prompt_only_examples():
  assert pl.format_prompts([ids("ab"), ids("c")], CharTokenizer()) == (
    "===== example 1 of 2 (2 prompt tokens) =====\nab\n\n"
    "===== example 2 of 2 (1 prompt tokens) =====\nc\n\n")


def test_pipeline_buckets_are_the_linear_policy():
  assert pl.PipelineConfig(8, 1024).buckets == pl.bucket_lengths(1024, 4) == (256, 512, 768, 1024)


def test_write_train_examples(tmp_path):
  path = pl.write_train_examples(tmp_path / "train_examples.txt", [tokenize("abc", "de", 16)], CharTokenizer())
  assert path.read_text(encoding="utf-8") == pl.format_train_examples([tokenize("abc", "de", 16)], CharTokenizer())


# --- the real DeepSeek-R1-Distill template (tests/r1_tokenizer.py) ----------------------------

CATALOG = Catalog(
  Item(r["item_id"], r["title"], {k: v for k, v in r.items() if k not in ("item_id", "title")}) for r in CATALOG_ROWS
)
EXAMPLE = Example("u1", ("A", "B", "C"), ("D",))


@pytest.mark.parametrize("target_format, completion", [
    ("direct", "\n</think>\n\nOrbit Staples"),
    ("cot", '{rationale}\n</think>\n\n<answer>\nOrbit Staples\n</answer>'),
])
def test_r1_boundary_one_bos_and_loss_mask(r1_tokenizer, target_format, completion):
  tok = r1_tokenizer
  cfg = PromptConfig(target_format=target_format)
  pair = build_sft_pair(EXAMPLE, CATALOG, tok, cfg, max_length=512)
  ex = pl.tokenize_example(pair, tok, max_length=512)
  tokens = ex.tokens.tolist()
  think, newline = tok.convert_tokens_to_ids("<think>"), tok.encode("\n", add_special_tokens=False)
  # Exactly one BOS, at position 0 (the template writes it; add_bos_token must not add another).
  assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 1
  # The prompt ends with the template's "<｜Assistant｜><think>\n"; the completion starts right after.
  assert tokens[ex.completion_start - 3:ex.completion_start] == [
      tok.convert_tokens_to_ids("<｜Assistant｜>"), think, *newline]
  assert think not in tokens[ex.completion_start:]  # no second <think>
  assert tokens[-1] == tok.eos_token_id and not ex.eos_lost
  decoded = tok.decode(tokens[ex.completion_start:-1])
  assert decoded == completion.format(rationale=decoded.split("\n</think>")[0])
  # Loss on exactly the completion tokens and the EOS (pad == eos here, so only the mask tells).
  assert tok.pad_token_id == tok.eos_token_id
  batch = pl.collate([ex], buckets=(512,), pad_id=tok.pad_token_id)
  trained = np.flatnonzero(batch["loss_mask"][0])
  np.testing.assert_array_equal(trained, np.arange(ex.completion_start - 1, len(tokens) - 1))
  assert batch["targets"][0, trained].tolist() == tokens[ex.completion_start:]
  assert batch["targets"][0, trained[-1]] == tok.eos_token_id


def test_r1_budgeted_history_keeps_bos_and_header_and_counts_events(r1_tokenizer):
  tok = r1_tokenizer
  cfg = PromptConfig(history_attributes=("brand",), target_format="cot")
  long = Example("u", ("A", "B", "C", "D", "E") * 6, ("A",))
  short_len = len(pl.tokenize_example(build_sft_pair(EXAMPLE, CATALOG, tok, cfg), tok, 10_000).tokens)
  max_length = short_len + 20  # room for a few of the 30 history items, not all
  format_fn = lambda e: build_sft_pair(e, CATALOG, tok, cfg, max_length=max_length)  # noqa: E731
  exs = [pl.tokenize_fn(format_fn, tok, max_length)(e) for e in (long, EXAMPLE)]
  long_ex = exs[0]
  assert len(long_ex.tokens) <= max_length + 1 and long_ex.tokens[-1] == tok.eos_token_id
  prompt = tok.decode(long_ex.tokens[:long_ex.completion_start])
  assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>Purchase history (oldest first):\n1. ")
  assert prompt.endswith("<｜Assistant｜><think>\n")
  assert (long_ex.history_truncated, long_ex.eos_lost) == (True, False)
  assert (exs[1].history_truncated, exs[1].eos_lost) == (False, False)
  stats = pl.split_stats(pl.collate(exs, pl.PipelineConfig(2, max_length).buckets, tok.pad_token_id))[1]
  assert stats == {"history_truncated": 1, "eos_lost": 0}
  # The preview shows exactly this: BOS, header, the marker right after "<think>\n", then the EOS.
  text = pl.format_train_examples(exs, tok)
  assert "history truncated" in text.splitlines()[0]
  assert f"<｜Assistant｜><think>\n{pl.LOSS_MARKER}\nThe most recent item is" in text
  assert "</answer><｜end▁of▁sentence｜>\n" in text


def test_augment_draws_anew_every_epoch_deterministically_and_resumes_exactly():
  def drop_digit(pair, rng):  # a visible random change: maybe drop the prompt's first letter
    return SftPair(pair.prompt[1:], pair.completion) if rng.random() < 0.5 else pair

  def rows(it, n):  # each row's tokens, without the bucket's padding
    return [tuple(t for t in r if t != PAD) for _ in range(n) for r in next(it)["input_ids"].tolist()]

  def epochs(stream):  # the rows of each epoch of 12 examples, in a fixed order
    return [sorted(stream[e * 12:(e + 1) * 12]) for e in range(len(stream) // 12)]

  a, b = pl.make_iterator(make_ds(augment=drop_digit)), pl.make_iterator(make_ds(augment=drop_digit))
  stream = rows(a, 6)
  assert stream == rows(b, 6)  # the same seed draws the same
  plain = rows(pl.make_iterator(make_ds()), 6)
  assert epochs(plain)[0] == epochs(plain)[1]
  assert epochs(stream)[0] != epochs(stream)[1]  # a fresh draw every epoch
  assert epochs(stream)[0] != epochs(plain)[0]
  # Resuming mid-stream reproduces the augmented batches.
  it = pl.make_iterator(make_ds(augment=drop_digit))
  rows(it, 2)
  state = it.get_state()
  expected = rows(it, 3)
  resumed = pl.make_iterator(make_ds(augment=drop_digit))
  resumed.set_state(state)
  assert rows(resumed, 3) == expected
