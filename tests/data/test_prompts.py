"""Prompt and target rendering: exact text, truncation, chat vs plain, direct vs CoT."""

from __future__ import annotations

import dataclasses

import pytest

from recllm_jax.data import (
  Catalog,
  Example,
  Item,
  PromptConfig,
  build_prompt,
  build_sft_pair,
  build_target,
  count_tokens,
  extract_titles,
  render_history,
)
from recllm_jax.data.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, USER_TOKEN

from sample_data import CATALOG_ROWS

CATALOG = Catalog(
  Item(r["item_id"], r["title"], {k: v for k, v in r.items() if k not in ("item_id", "title")}) for r in CATALOG_ROWS
)
EXAMPLE = Example("u1", ("A", "B", "C"), ("D",), profile={"age_band": "25-34", "occupation": "teacher"})
CFG = PromptConfig(history_attributes=("brand", "category"))

USER_TEXT = (
  "User profile: age band: 25-34; occupation: teacher\n"
  "\n"
  "Purchase history (oldest first):\n"
  "1. Acme Gel Pen, Blue, 12-Pack (brand: Acme, category: Pens)\n"
  "2. Acme Spiral Notebook (brand: Acme, category: Notebooks)\n"
  "3. Orbit Stapler (brand: Orbit, category: Staplers)\n"
  "\n"
  "Based on this history, recommend the item the user is most likely to buy next. "
  "Reply with the exact title of the item and nothing else."
)


def test_plain_prompt_exact():
  assert build_prompt(EXAMPLE, CATALOG, None, CFG) == USER_TEXT + "\n\nAnswer: "
  with_system = dataclasses.replace(CFG, system_prompt="You recommend office supplies.")
  assert build_prompt(EXAMPLE, CATALOG, None, with_system) == (
    "You recommend office supplies.\n\n" + USER_TEXT + "\n\nAnswer: "
  )


def test_chat_prompt_exact(trained_tokenizer):
  cfg = dataclasses.replace(CFG, max_history_tokens=10_000)
  assert build_prompt(EXAMPLE, CATALOG, trained_tokenizer, cfg) == f"{BOS_TOKEN}{USER_TOKEN}{USER_TEXT}{ASSISTANT_TOKEN}"
  cfg = dataclasses.replace(cfg, system_prompt="SYS")
  assert build_prompt(EXAMPLE, CATALOG, trained_tokenizer, cfg) == f"{BOS_TOKEN}SYS{USER_TOKEN}{USER_TEXT}{ASSISTANT_TOKEN}"
  # Opting out of the chat template gives the plain layout even with a tokenizer.
  plain = dataclasses.replace(cfg, use_chat_template=False, system_prompt=None)
  assert build_prompt(EXAMPLE, CATALOG, trained_tokenizer, plain) == USER_TEXT + "\n\nAnswer: "


def test_no_profile_no_history_and_custom_templates():
  cold = Example("u2", (), ("A",))
  assert build_prompt(cold, CATALOG, None, PromptConfig()) == (
    "The user has no purchase history yet.\n\n"
    "Based on this history, recommend the item the user is most likely to buy next. "
    "Reply with the exact title of the item and nothing else.\n\nAnswer: "
  )
  cfg = PromptConfig(
    history_attributes=["category"],  # lists from config files are accepted
    history_header="",
    history_item_template="- {title}{details}\n",
    details_template=" [{attributes}]",
    user_template="{history}{instruction}",
    instruction="Next?",
    plain_template="{user}\n=> ",
  )
  assert cfg.history_attributes == ("category",)
  assert build_prompt(EXAMPLE, CATALOG, None, cfg) == (
    "- Acme Gel Pen, Blue, 12-Pack [category: Pens]\n- Acme Spiral Notebook [category: Notebooks]\n"
    "- Orbit Stapler [category: Staplers]\nNext?\n=> "
  )


def test_truncation_drops_oldest_items_first():
  # Word counts (no tokenizer): "1. Acme Gel Pen, Blue, 12-Pack"=6, "1. Acme Spiral Notebook"=4, "2. Orbit Stapler"=3.
  cfg = PromptConfig(history_attributes=(), max_history_tokens=7)
  text, kept = render_history(EXAMPLE, CATALOG, None, cfg)
  assert kept == 2
  assert text == "Purchase history (oldest first):\n1. Acme Spiral Notebook\n2. Orbit Stapler\n"
  assert render_history(EXAMPLE, CATALOG, None, dataclasses.replace(cfg, max_history_tokens=13))[1] == 3
  # Even a zero budget keeps the newest item: a prompt without history is useless.
  text, kept = render_history(EXAMPLE, CATALOG, None, dataclasses.replace(cfg, max_history_tokens=0))
  assert (kept, text) == (1, "Purchase history (oldest first):\n1. Orbit Stapler\n")


def test_truncation_with_tokenizer_is_tight(trained_tokenizer):
  long = Example("u", ("A", "B", "C", "D", "E") * 6, ("A",))
  cfg = PromptConfig(history_attributes=("brand",), max_history_tokens=60)
  text, kept = render_history(long, CATALOG, trained_tokenizer, cfg)
  body = text.removeprefix(cfg.history_header)
  assert 1 <= kept < len(long.history)
  assert count_tokens(body, trained_tokenizer) <= 60
  assert body.splitlines()[-1] == f"{kept}. Orbit Staples (brand: Orbit)"  # newest item last
  # Tight: the newest kept+1 items (renumbered from 1) would not have fitted.
  unlimited = dataclasses.replace(cfg, max_history_tokens=10_000)
  one_more = dataclasses.replace(long, history=long.history[-(kept + 1):])
  text_more, kept_more = render_history(one_more, CATALOG, trained_tokenizer, unlimited)
  assert kept_more == kept + 1
  assert count_tokens(text_more.removeprefix(cfg.history_header), trained_tokenizer) > 60


def test_direct_targets():
  assert build_target(EXAMPLE, CATALOG, CFG) == "Orbit Staples"
  multi = dataclasses.replace(EXAMPLE, targets=("C", "D"))
  assert build_target(multi, CATALOG, CFG) == "Orbit Stapler\nOrbit Staples"
  piped = dataclasses.replace(CFG, item_delimiter=" | ")
  assert build_target(multi, CATALOG, piped) == "Orbit Stapler | Orbit Staples"
  assert extract_titles("Orbit Stapler | Orbit Staples ", piped) == ["Orbit Stapler", "Orbit Staples"]


COT = dataclasses.replace(CFG, target_format="cot")
COT_TARGET = (
  "<think>\n"
  'The most recent item is "Orbit Stapler".\n'
  "Most frequent brand: Acme (2 of 3 recent items).\n"
  "Most frequent category: Staplers (1 of 3 recent items).\n"  # ties go to the most recent value
  "The next item is likely: brand Orbit, category Staples.\n"
  "</think>\n"
  "<answer>Orbit Staples</answer>"
)


def test_cot_target_exact():
  assert build_target(EXAMPLE, CATALOG, COT) == COT_TARGET
  assert extract_titles(COT_TARGET, COT) == ["Orbit Staples"]
  cold = build_target(Example("u", (), ("A",)), CATALOG, COT)
  assert cold.startswith("<think>\nThe user has no history")


def test_cot_prompt_and_sft_pair_respect_visible_history():
  prompt, completion = build_sft_pair(EXAMPLE, CATALOG, None, COT)
  assert prompt.endswith(
    "Think briefly inside <think></think>, then give the exact title of the item inside <answer></answer>.\n\nAnswer: "
  )
  assert completion == COT_TARGET
  tight = dataclasses.replace(COT, max_history_tokens=0)  # only the newest item is shown
  _, completion = build_sft_pair(EXAMPLE, CATALOG, None, tight)
  assert "Most frequent brand: Orbit (1 of 1 recent items)." in completion


@pytest.mark.parametrize(
  "completion",
  ["Orbit Staples", "<answer>Orbit Staples</answer>", "<think>x<answer>Orbit Staples</answer>",
   "<answer>Orbit Staples</answer><think>x</think>"],
)
def test_malformed_cot_completions(completion):
  assert extract_titles(completion, COT) is None


def test_config_validation():
  with pytest.raises(ValueError, match="target_format"):
    PromptConfig(target_format="json")
  with pytest.raises(ValueError, match="item_delimiter"):
    PromptConfig(item_delimiter="")
  with pytest.raises(ValueError, match="max_history_tokens"):
    PromptConfig(max_history_tokens=-1)
  hash(PromptConfig(history_attributes=["brand"]))
