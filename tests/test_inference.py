"""recllm_jax.inference: catalog tries with duplicate titles, vote ranking, batching and the
top-K `recommend` of a tiny direct-format SFT model trained here (~10 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax import constraints as cons
from recllm_jax import decoding
from recllm_jax import inference
from recllm_jax.data import Catalog, Example, Item
from recllm_jax.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "train"))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)
from test_grpo import SFT, configure  # noqa: E402  (the fast tiny SFT setup)


class CharTokenizer:
  """One token per character (code point), enough for trie construction."""

  def encode(self, text, add_special_tokens=False):
    return [ord(c) for c in text]

  def __len__(self):
    return 256


# --- host pieces ---------------------------------------------------------------------------


def test_from_catalog_maps_a_shared_title_to_all_its_items():
  catalog = Catalog([Item("a", "Red Pen"), Item("b", "Blue Pen"), Item("c", "Red Pen"),
                     Item("d", "Red")])
  trie = cons.ItemTrie.from_catalog(catalog, CharTokenizer())
  assert trie.num_items == 4 and trie.num_leaves == 3  # titles() would keep 3 items only
  assert trie.item_ids == ("a", "b", "c", "d")
  red_pen = trie.lookup([ord(c) for c in "Red Pen"])
  assert trie.catalog_ids(red_pen) == ["a", "c"]
  assert trie.catalog_ids(trie.lookup([ord(c) for c in "Red"])) == ["d"]
  assert trie.catalog_ids(trie.lookup([ord(c) for c in "Blue Pen"])) == ["b"]
  np.testing.assert_array_equal(trie.item_leaf, [red_pen, trie.item_leaf[1], red_pen,
                                                 trie.item_leaf[3]])
  with pytest.raises(ValueError, match="from_catalog"):
    cons.ItemTrie.from_titles(catalog.titles(), CharTokenizer()).catalog_ids(0)


def test_rank_by_votes_counts_then_best_score_then_first_seen():
  votes = [([("x", "X")], -3.0), ([("y", "Y")], -1.0), ([("x", "X"), ("x", "X")], -2.0),
           ([(None, "Nope")], -0.5), ([("z", "Z")], -1.0), ([("y", "Y")], -4.0),
           ([], 0.0), ([(None, "Other")], -0.1)]
  # x: 2 votes (best -2), y: 2 votes (best -1), then 1 vote each: Other -0.1, Nope -0.5, z -1.
  assert inference.rank_by_votes(votes, 10) == ["y", "x", None, None, "z"]
  assert inference.rank_by_votes(votes, 2) == ["y", "x"]


def test_batch_rows_have_one_size_divisible_by_the_batch_devices():
  assert list(inference.batch_rows(5, 4, 4)) == [[0, 1, 2, 3], [4, 4, 4, 4]]
  assert list(inference.batch_rows(3, 32, 8)) == [[0, 1, 2, 2, 2, 2, 2, 2]]
  assert list(inference.batch_rows(9, 6, 4)) == [list(range(8)), [8] * 8]


def test_history_rows_bucket_the_width():
  index_of = {"a": 0, "b": 1, "c": 2}
  short = [Example("u", ("a", "b"), ("c",)), Example("v", ("c",), ("a",))]
  np.testing.assert_array_equal(inference.history_rows(short, index_of),
                                [[0, 1] + [-1] * 14, [2] + [-1] * 15])
  long = [Example("u", ("a", "zz") + ("b",) * 16, ("c",))]  # 18 events -> width 32
  rows = inference.history_rows(long, index_of)
  assert rows.shape == (1, 32)
  np.testing.assert_array_equal(rows[0, :18], [0] + [1] * 16 + [-1])  # unknown ids are skipped


def test_cot_constrained_needs_cot_prompts():
  from recllm_jax.data.prompts import PromptConfig

  with pytest.raises(ValueError, match="target_format='cot'"):
    inference.mode_prompt_config(PromptConfig(target_format="direct"), "cot_constrained")
  with pytest.raises(ValueError, match="mode="):
    inference.mode_prompt_config(PromptConfig(), "greedy")


# --- a trained model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(model, tokenizer, dataset, prompt config) of a tiny direct-format SFT run."""
  import recllm_jax
  from recllm_jax.data import load_dataset
  from recllm_jax.data.prompts import PromptConfig
  from recllm_jax.train.loop import train

  root = tmp_path_factory.mktemp("inference")
  data = generate_synthetic(root / "data", num_items=60, num_users=60, seed=0)
  config = configure(sft_configs.get_config("tiny"), workdir=str(root / "sft"),
                     **{"data.dir": str(data), "data.prompt.target_format": "direct",
                        # 300 steps: at 150, free sampling spells a real title in 2 of 64
                        # samples (digits are single tokens under Qwen2's pre-tokenizer).
                        **SFT, "train.num_steps": 300})
  train(config)
  model, tokenizer, saved = recllm_jax.load_checkpoint(root / "sft")
  dataset = load_dataset(data, "synthetic")
  return model, tokenizer, dataset, PromptConfig(**saved.data.prompt.to_dict())


def test_beam_returns_k_distinct_catalog_items_independent_of_batching(trained):
  model, tokenizer, ds, prompt_cfg = trained
  examples = ds.test[:10]
  ranked = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, k=5,
                               batch_size=8)
  assert len(ranked) == len(examples)
  for row in ranked:
    assert len(row) == 5 and len(set(row)) == 5 and all(i in ds.catalog for i in row), row
  assert len({tuple(r) for r in ranked}) > 1, "every user got the same list"
  # The padded tail batch and the batch position do not change an example's list.
  alone = inference.recommend(model, tokenizer, examples[8:9], ds.catalog, prompt_cfg, k=5,
                              batch_size=8)
  assert alone == ranked[8:9]


def test_bare_histories_rank_as_their_examples(trained):
  """`recllm_jax.recommend` on a new user's history (item ids, no Example, no target)."""
  import recllm_jax

  model, tokenizer, ds, prompt_cfg = trained
  examples = [ex for ex in ds.test[:3] if not ex.profile]  # a bare history carries no profile
  assert examples
  bare = recllm_jax.recommend(model, tokenizer, [list(ex.history) for ex in examples],
                              ds.catalog, prompt_cfg, k=5, batch_size=8)
  assert bare == inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, k=5,
                                     batch_size=8)
  assert inference.as_examples([["P1"]])[0].user_id == "user0"


def test_beam_as_wide_as_the_catalog_is_exact_scoring(trained):
  """With a beam per title nothing is pruned, so the ranking is the exact one: every title
  teacher-forced after the prompt and ranked by its log-probability (EOS included)."""
  import jax
  import jax.numpy as jnp

  from recllm_jax.data import pipeline

  model, tokenizer, ds, prompt_cfg = trained
  examples = ds.test[:2]
  titles = sorted({item.title for item in ds.catalog})
  assert len(titles) == len(ds.catalog)  # synthetic titles are unique: one id per title
  ranked = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg,
                               k=len(titles), batch_size=8)
  eos = tokenizer.eos_token_id
  for ex, row in zip(examples, ranked):
    _, prompt = inference.prompt_ids(ex, ds.catalog, tokenizer, prompt_cfg, "beam")
    seqs = [prompt + tokenizer.encode(t, add_special_tokens=False) + [eos] for t in titles]
    width = max(map(len, seqs))
    ids = np.array([s + [pipeline.pad_id(tokenizer)] * (width - len(s)) for s in seqs], np.int32)
    mask = (np.arange(width)[None] < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))  # [N, T, V]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))  # [N, T, V]
    scores = np.array([sum(logp[n, t - 1, s[t]] for t in range(len(prompt), len(s)))
                       for n, s in enumerate(seqs)])  # [titles]
    exact = [titles[i] for i in np.argsort(-scores, kind="stable")]
    assert [ds.catalog.title(i) for i in row[:10]] == exact[:10]


def test_history_exclusion_with_bucketed_widths_reuses_the_decoder(trained):
  model, tokenizer, ds, prompt_cfg = trained
  by_length = sorted(ds.test, key=lambda ex: len(ex.history))
  short, longer = by_length[:8], by_length[-8:]
  assert len(longer[-1].history) > len(short[-1].history)
  assert len(longer[-1].history) <= 16  # one history bucket (synthetic histories are short)
  kwargs = dict(k=4, batch_size=8, exclude_history=True)
  first = inference.recommend(model, tokenizer, short, ds.catalog, prompt_cfg, **kwargs)
  compiled = decoding.compile_count()
  second = inference.recommend(model, tokenizer, longer, ds.catalog, prompt_cfg, **kwargs)
  assert decoding.compile_count() == compiled
  for ex, row in zip(short + longer, first + second):
    assert len(row) == 4 and not set(row) & set(ex.history), (ex.history, row)


def test_sample_mode_grounds_votes(trained):
  model, tokenizer, ds, prompt_cfg = trained
  ranked = inference.recommend(model, tokenizer, ds.test[:4], ds.catalog, prompt_cfg, k=5,
                               mode="sample", num_samples=4, max_new_tokens=32,
                               temperature=0.7, batch_size=8)
  assert len(ranked) == 4
  for row in ranked:
    assert 1 <= len(row) <= 4
    assert all(i is None or i in ds.catalog for i in row)
    assert len([i for i in row if i is not None]) == len({i for i in row if i is not None})
  assert any(i is not None for row in ranked for i in row)


def test_beam_lists_every_item_of_a_shared_title_together(trained):
  from recllm_jax.data import Catalog, Item

  model, tokenizer, ds, prompt_cfg = trained
  items = list(ds.catalog)
  twin = Item("TWIN", items[3].title)  # a second id for an existing title, last in the catalog
  catalog = Catalog(items + [twin])
  examples = ds.test[:2]
  k = len(items) + 1  # a beam per title: every title is returned
  ranked = inference.recommend(model, tokenizer, examples, catalog, prompt_cfg, k=k,
                               batch_size=8)
  plain = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg,
                              k=len(items), batch_size=8)
  for row, base in zip(ranked, plain):
    assert sorted(row) == sorted(i.item_id for i in catalog)
    at = row.index(items[3].item_id)
    assert row[at + 1] == "TWIN"  # catalog order within the shared leaf
    assert [i for i in row if i != "TWIN"] == base  # the ranking of titles is unchanged


def test_cf_prior_in_the_beam(trained):
  """CF-guided beam: weight 0 is the LLM alone; a prior that puts (nearly) all mass on one item
  per example, strongly weighted, ranks that item first; the sampling modes refuse a prior."""
  model, tokenizer, ds, prompt_cfg = trained
  examples = ds.test[:4]
  chosen = [len(ds.catalog) - 1 - r for r in range(len(examples))]  # a different item each

  def cf_prior(batch):  # [B, I] log-probs, catalog order
    logp = np.full((len(batch), len(ds.catalog)), -40.0)
    for r, ex in enumerate(batch):
      logp[r, chosen[examples.index(ex)]] = 0.0
    return logp

  kwargs = dict(k=5, batch_size=8)
  plain = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, **kwargs)
  off = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, cf_prior=cf_prior,
                            cf_weight=0.0, **kwargs)
  assert off == plain
  guided = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg,
                               cf_prior=cf_prior, cf_weight=5.0, **kwargs)
  ids = [item.item_id for item in ds.catalog]
  assert [row[0] for row in guided] == [ids[c] for c in chosen]
  with pytest.raises(ValueError, match="mode='beam'"):
    inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, mode="sample",
                        cf_prior=cf_prior, cf_weight=1.0, **kwargs)


# --- bad inputs: one-line user errors, cut histories counted ---------------------------------


def _with_history(example, history):
  """`example` with another history (its timestamps and actions, aligned with it, dropped)."""
  import dataclasses

  return dataclasses.replace(example, history=tuple(history), timestamps=None, actions=None)


def test_bad_histories_are_one_line_errors_naming_the_example_and_the_item(trained):
  from recllm_jax.errors import UserError

  model, tokenizer, ds, prompt_cfg = trained
  ex = ds.test[0]
  first = ex.history[0]
  where = f"example 1 (user {ex.user_id!r}): "
  cases = {  # history -> the message
      (): "the history is empty: recommend needs at least one item the user interacted with",
      ex.history[:2] + ("P99999",): "history[2] 'P99999' is not in the catalog (60 items): "
                                    "neither an item id nor the title of one",
      # Users' own histories given as titles: one in the catalog, one that is not.
      (first, ds.catalog.title(first)): f"history[1] {ds.catalog.title(first)!r} is the title of "
                                        f"{first!r}, not an item id: histories hold catalog item ids",
      ("Purple Stapler, 12-Pack",): "history[0] 'Purple Stapler, 12-Pack' is not in the catalog "
                                    "(60 items): neither an item id nor the title of one",
  }
  for history, message in cases.items():
    with pytest.raises(inference.ExampleError) as raised:
      inference.recommend(model, tokenizer, [ex, _with_history(ex, history)], ds.catalog,
                          prompt_cfg, k=3)
    assert isinstance(raised.value, UserError) and str(raised.value) == where + message
    assert (raised.value.index, raised.value.user_id) == (1, ex.user_id)
    assert raised.value.item == (history[-1] if history else None)


def test_a_catalog_the_model_was_not_trained_on_is_a_one_line_error(trained):
  import copy

  from recllm_jax.data.items import SidCodec
  from recllm_jax.data.sids import format_sid

  model, tokenizer, ds, prompt_cfg = trained  # a title model: its tokenizer has no SID tokens
  examples = ds.test[:2]
  sids = {item.item_id: format_sid((i // 8, i % 8)) for i, item in enumerate(ds.catalog)}
  with pytest.raises(inference.CatalogMismatchError,
                     match=r"semantic IDs use 16 tokens the model does not have \(first: '<a_0>'\)"):
    inference.recommend(model, tokenizer, examples, SidCodec(ds.catalog, sids), prompt_cfg, k=3)
  sid_tokenizer = copy.deepcopy(tokenizer)  # as a SID run's tokenizer: with SID tokens added
  sid_tokenizer.add_tokens(["<a_0>", "<a_1>", "<b_0>"])
  with pytest.raises(inference.CatalogMismatchError,
                     match=r"writes items as semantic IDs \(its tokenizer has 2 first-level SID "
                           r"tokens such as '<a_0>'\), but the catalog is given as titles"):
    inference.recommend(model, sid_tokenizer, examples, ds.catalog, prompt_cfg, k=3)
  smaller = Catalog(list(ds.catalog)[:10])
  trie = cons.ItemTrie.from_catalog(smaller, tokenizer, vocab_size=model.cfg.vocab_size)
  with pytest.raises(inference.CatalogMismatchError, match="trie= has 10 items over"):
    inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, k=3, trie=trie)


def test_histories_longer_than_the_prompt_budget_are_cut_and_counted(trained):
  from recllm_jax.data.prompts import render_history

  model, tokenizer, ds, prompt_cfg = trained
  examples = ds.test[:10]  # the shapes of the test above: nothing compiles again
  shown = [render_history(ex, ds.catalog, tokenizer, prompt_cfg)[1] for ex in examples]
  cut = sum(n < len(ex.history) for n, ex in zip(shown, examples))
  assert cut > 0  # the fixture's 40-token budget cuts synthetic histories
  ranked = inference.recommend(model, tokenizer, examples, ds.catalog, prompt_cfg, k=5,
                               batch_size=8)
  assert isinstance(ranked, list) and len(ranked) == len(examples)
  assert ranked.histories_cut == cut
  newest = _with_history(examples[8], examples[8].history[-shown[8]:])  # what its prompt shows
  alone = inference.recommend(model, tokenizer, [newest], ds.catalog, prompt_cfg, k=5,
                              batch_size=8)
  assert alone.histories_cut == 0 and alone == ranked[8:9]  # the oldest items were dropped
