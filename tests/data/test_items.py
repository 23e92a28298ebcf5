"""Item codecs: titles and semantic IDs in prompts, targets, the history loss and parsing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recllm_jax.data import pipeline
from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError
from recllm_jax.data.items import SidCodec, TitleCodec, as_codec, make_codec
from recllm_jax.data.prompts import PromptConfig, build_sft_pair, parse_completion
from recllm_jax.data.schema import Example, user_sequences
from recllm_jax.data.sids import SID_FILE, write_sid_file

SIDS = {"p1": "<a_1><b_2><c_3>", "p2": "<a_1><b_2><c_4>", "p3": "<a_7><b_0><c_0>",
        "p4": "<a_7><b_0><c_0>"}  # p3 and p4 collide


def _catalog(with_sids: bool = True) -> Catalog:
  titles = {"p1": "Blue Pen", "p2": "Red Pen", "p3": "Stapler", "p4": "Stapler"}
  return Catalog(Item(i, t, {"brand": "Acme", **({"sid": SIDS[i]} if with_sids else {})})
                 for i, t in titles.items())


def test_title_codec_is_the_catalog_titles():
  codec = as_codec(_catalog())
  assert isinstance(codec, TitleCodec) and codec.new_tokens() == ()
  assert codec.text("p1") == "Blue Pen"
  assert codec.ids_for_text("  Stapler ") == ["p3", "p4"]  # shared title: both, catalog order


def test_sid_codec_reads_the_items_own_sids_and_resolves_collisions():
  codec = make_codec("sid", _catalog())
  assert isinstance(codec, SidCodec)
  assert codec.text("p1") == "<a_1><b_2><c_3>"
  # The colliding pair gets a fourth level, both of them, so neither SID prefixes the other.
  assert (codec.text("p3"), codec.text("p4")) == ("<a_7><b_0><c_0><d_0>", "<a_7><b_0><c_0><d_1>")
  assert len(set(codec.texts())) == 4
  assert codec.ids_for_text("<a_7> <b_0><c_0><d_1>") == ["p4"]
  assert codec.ids_for_text("<a_7><b_0><c_0>") == []  # a prefix is not an item
  assert codec.new_tokens() == ("<a_1>", "<a_7>", "<b_0>", "<b_2>", "<c_0>", "<c_3>", "<c_4>",
                                "<d_0>", "<d_1>")


def test_sid_file_beside_the_data_wins_over_the_items_own(tmp_path):
  built = {i: s.replace("<a_", "<a_9") for i, s in SIDS.items() if i != "p4"}
  built["p4"] = "<a_5><b_5><c_5>"
  write_sid_file(tmp_path / SID_FILE, built)
  assert make_codec("sid", _catalog(), tmp_path).text("p1") == "<a_91><b_2><c_3>"


def test_sid_file_named_by_the_run_wins_over_the_one_beside_the_data(tmp_path):
  write_sid_file(tmp_path / SID_FILE, {**SIDS, "p1": "<a_91><b_2><c_3>"})
  elsewhere = tmp_path / "run" / "built.tsv"
  elsewhere.parent.mkdir()
  write_sid_file(elsewhere, {**SIDS, "p1": "<a_92><b_2><c_3>"})
  assert make_codec("sid", _catalog(), tmp_path, elsewhere).text("p1") == "<a_92><b_2><c_3>"
  with pytest.raises(DataError, match=r"data.sid_file='.*missing.tsv' does not exist.*build_sids.py"):
    make_codec("sid", _catalog(), tmp_path, tmp_path / "missing.tsv")


def test_missing_sids_name_the_fix(tmp_path):
  with pytest.raises(DataError, match="build_sids.py"):
    make_codec("sid", _catalog(with_sids=False), tmp_path)
  partial = _catalog(with_sids=False)
  partial["p1"].attributes["sid"] = SIDS["p1"]
  with pytest.raises(DataError, match="3 of 4 items have no semantic ID"):
    make_codec("sid", partial)
  with pytest.raises(ValueError, match="item_format"):
    make_codec("name", _catalog())


def test_sid_prompt_history_target_and_parse():
  codec = make_codec("sid", _catalog())
  cfg = PromptConfig(history_attributes=(), history_item_template="{index}. {item} {title}\n")
  ex = Example("u", ("p1", "p2"), ("p3",))
  pair = build_sft_pair(ex, codec, None, cfg)
  assert "1. <a_1><b_2><c_3> Blue Pen\n2. <a_1><b_2><c_4> Red Pen\n" in pair.prompt
  assert "exact semantic ID of the item" in pair.prompt
  assert pair.completion == "<a_7><b_0><c_0><d_0>"
  parsed = parse_completion(pair.completion, cfg)
  assert [codec.ids_for_text(t) for t in parsed.titles] == [["p3"]]
  cot = build_sft_pair(ex, codec, None, dataclasses.replace(cfg, target_format="cot"))
  assert cot.completion.endswith("<answer>\n<a_7><b_0><c_0><d_0>\n</answer>")
  assert 'The most recent item is "<a_1><b_2><c_4>".' in cot.completion


def test_title_prompts_are_unchanged_by_the_codec():
  cfg = PromptConfig()
  ex = Example("u", ("p1", "p2"), ("p3",))
  assert build_sft_pair(ex, _catalog(), None, cfg) == build_sft_pair(ex, TitleCodec(_catalog()),
                                                                      None, cfg)


def test_history_loss_trains_the_sid_tokens_of_history_items_after_the_first(tmp_path):
  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  codec = make_codec("sid", _catalog())
  tok = train_bpe_tokenizer(["Blue Pen Red Pen Stapler Purchase history"] * 4, tmp_path,
                            vocab_size=300, added_tokens=codec.new_tokens())
  cfg = PromptConfig(history_attributes=())
  ex = Example("u", ("p1", "p2", "p4"), ("p3",))
  pair = build_sft_pair(ex, codec, tok, cfg, history_loss=True)
  assert [pair.prompt[a:b] for a, b in pair.history_spans] == [codec.text("p2"), codec.text("p4")]
  te = pipeline.tokenize_example(pair, tok, 512)
  batch = pipeline.collate([te], [512], pad_id=tok.pad_token_id)
  trained = batch["targets"][0][batch["loss_mask"][0] > 0]
  sid = lambda i: tok.encode(codec.text(i), add_special_tokens=False)
  # Items 2 and 3 of the history (3 + 4 tokens), then the target's 4 tokens and the EOS.
  assert trained.tolist() == sid("p2") + sid("p4") + sid("p3") + [tok.eos_token_id]
  assert len(sid("p4")) == 4  # every code is one added token
  text = pipeline.format_train_examples([te], tok)
  assert "[[<a_1><b_2><c_4>]]" in text and "7 trained history tokens" in text
  # Off by default: the target alone.
  plain = pipeline.tokenize_example(build_sft_pair(ex, codec, tok, cfg), tok, 512)
  assert plain.prompt_targets == ()


def test_user_sequences_keep_the_longest_sequence_of_each_user():
  a = Example("a", ("1",), ("2",))
  a2 = Example("a", ("1", "2"), ("3",))
  other = Example("a", ("5",), ("6",))  # not a prefix of a2: kept
  b = Example("b", ("1",), ("2",))  # another user: kept
  dup = Example("a", ("1", "2"), ("3",))
  assert user_sequences([a, a2, other, b, dup]) == [a2, other, b]


def test_sid_trie_has_one_leaf_per_item(trained_tokenizer):
  from recllm_jax.constraints import ItemTrie
  import transformers

  codec = make_codec("sid", _catalog())
  tok = trained_tokenizer
  tok = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
  tok.add_tokens(list(codec.new_tokens()))
  trie = ItemTrie.from_codec(codec, tok, vocab_size=len(tok))
  assert trie.num_leaves == 4 and {len(s) for s in trie.leaf_sequences} == {3, 4}
  leaves = [trie.lookup(tok.encode(codec.text(i), add_special_tokens=False)) for i in SIDS]
  assert sorted(trie.catalog_ids(leaf)[0] for leaf in leaves) == sorted(SIDS)
  assert np.all(np.asarray(leaves) >= 0)


def test_alignment_tasks_name_an_item_by_its_other_name(r1_tokenizer):
  from recllm_jax.data.prompts import AlignmentExample, alignment_examples, build_alignment_pair

  codec = make_codec("sid", _catalog())
  cfg = PromptConfig()
  to_sid = build_alignment_pair(AlignmentExample("p2", "title2item"), codec, None, cfg)
  assert 'Which item has the title "Red Pen"? Reply with its semantic ID' in to_sid.prompt
  assert to_sid.completion == "<a_1><b_2><c_4>"
  back = build_alignment_pair(AlignmentExample("p2", "item2title"), codec, None, cfg)
  assert "What is the title of the item <a_1><b_2><c_4>?" in back.prompt
  assert back.completion == "Red Pen"
  # Under the real R1 template the prompt opens a think block: the answer closes it first.
  r1 = build_alignment_pair(AlignmentExample("p2", "title2item"), codec, r1_tokenizer, cfg)
  assert r1.prompt.endswith("<｜Assistant｜><think>\n")
  assert r1.completion == "\n</think>\n\n<a_1><b_2><c_4>"
  tasks = alignment_examples(codec, ["title2item", "item2title"])
  assert [(a.item_id, a.task) for a in tasks[:2]] == [("p1", "title2item"), ("p2", "title2item")]
  assert len(tasks) == 8
  with pytest.raises(ValueError, match="alignment task"):
    AlignmentExample("p1", "sid2sid")


@pytest.mark.parametrize("template", ["{item}\n", "{index}. {item}{details}\n",
                                      "{title}: {item}\n", "{index}) {title} = {item} ({index})\n"])
def test_history_spans_find_the_item_wherever_the_line_template_puts_it(template):
  # {item} first on the line once found no span at all, so history_loss silently trained
  # nothing but the target.
  codec = make_codec("sid", _catalog())
  cfg = PromptConfig(history_attributes=(), history_item_template=template)
  ex = Example("u", ("p1", "p2", "p4"), ("p3",))
  pair = build_sft_pair(ex, codec, None, cfg, history_loss=True)
  assert [pair.prompt[a:b] for a, b in pair.history_spans] == [codec.text("p2"), codec.text("p4")]


def test_history_spans_of_titles_written_by_the_title_field():
  codec = make_codec("title", _catalog())
  cfg = PromptConfig(history_attributes=(), history_item_template="{index}. {title}\n")
  pair = build_sft_pair(Example("u", ("p1", "p2", "p4"), ("p3",)), codec, None, cfg,
                        history_loss=True)
  assert [pair.prompt[a:b] for a, b in pair.history_spans] == [codec.text("p2"), codec.text("p4")]
