"""Prompt and target rendering and completion parsing: exact text, truncation, chat vs plain,
direct vs CoT, the offline BPE's template and the real DeepSeek-R1-Distill one (think-opening)."""

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
from recllm_jax.data.prompts import (
  EMPTY_THINK,
  PARSE_REASONS,
  ParsedCompletion,
  SftPair,
  direct_answer_prefix,
  parse_completion,
  prompt_opens_think,
)
from recllm_jax.data.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, encode_prompt

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
  assert build_target(EXAMPLE, CATALOG, CFG, think_open=True) == "\n</think>\n\nOrbit Staples"
  assert direct_answer_prefix(True) == "\n</think>\n\n" and direct_answer_prefix(False) == ""
  multi = dataclasses.replace(EXAMPLE, targets=("C", "D"))
  assert build_target(multi, CATALOG, CFG) == "Orbit Stapler\nOrbit Staples"
  piped = dataclasses.replace(CFG, item_delimiter=" | ")
  assert build_target(multi, CATALOG, piped) == "Orbit Stapler | Orbit Staples"
  assert extract_titles("Orbit Stapler | Orbit Staples ", piped) == ["Orbit Stapler", "Orbit Staples"]


COT = dataclasses.replace(CFG, target_format="cot")
RATIONALE = (
  'The most recent item is "Orbit Stapler".\n'
  "Most frequent brand: Acme (2 of 3 recent items).\n"
  "Most frequent category: Staplers (1 of 3 recent items).\n"  # ties go to the most recent value
  "The next item is likely: brand Orbit, category Staples."
)
COT_TARGET = "<think>\n" + RATIONALE + "\n</think>\n\n<answer>\nOrbit Staples\n</answer>"


def test_cot_target_exact():
  assert build_target(EXAMPLE, CATALOG, COT) == COT_TARGET
  # After a think-opening prompt ("...<think>\n") the completion starts inside the block.
  assert build_target(EXAMPLE, CATALOG, COT, think_open=True) == COT_TARGET.removeprefix("<think>\n")
  assert extract_titles(COT_TARGET, COT) == ["Orbit Staples"]
  cold = build_target(Example("u", (), ("A",)), CATALOG, COT)
  assert cold.startswith("<think>\nThe user has no history")


def test_cot_prompt_and_sft_pair_respect_visible_history():
  pair = build_sft_pair(EXAMPLE, CATALOG, None, COT)
  assert pair.prompt.endswith(
    "Think briefly inside <think></think>, then give the exact title of the item inside <answer></answer>.\n\nAnswer: "
  )
  assert pair == SftPair(pair.prompt, COT_TARGET, history_kept=3, history_total=3)
  assert not pair.history_truncated
  tight = dataclasses.replace(COT, max_history_tokens=0)  # only the newest item is shown
  pair = build_sft_pair(EXAMPLE, CATALOG, None, tight)
  assert "Most frequent brand: Orbit (1 of 1 recent items)." in pair.completion
  assert (pair.history_kept, pair.history_total, pair.history_truncated) == (1, 3, True)


MULTI = dataclasses.replace(EXAMPLE, targets=("C", "D"))


@pytest.mark.parametrize("think_open", [False, True])
@pytest.mark.parametrize("cfg", [CFG, COT, dataclasses.replace(COT, item_delimiter=" | ")], ids=["direct", "cot", "cot|"])
@pytest.mark.parametrize("example", [EXAMPLE, MULTI], ids=["one", "two"])
def test_build_target_parse_completion_round_trip(example, cfg, think_open):
  completion = build_target(example, CATALOG, cfg, think_open=think_open)
  want = tuple(CATALOG[i].title for i in example.targets)
  assert parse_completion(completion, cfg, think_open=think_open) == ParsedCompletion(want, "ok")
  # Generations decoded with special tokens end with EOS (and padding); that is ignored.
  assert parse_completion(completion + EOS_TOKEN + "\n", cfg, think_open=think_open).titles == want
  assert extract_titles(completion, cfg, think_open=think_open) == list(want)


@pytest.mark.parametrize(
  "completion, cfg, think_open, reason",
  [
    # cot always needs a closed think block, whoever opened it.
    ("Orbit Staples", COT, False, "unclosed_think"),
    ("<answer>\nOrbit Staples\n</answer>", COT, False, "unclosed_think"),
    ("<think>\nx\n<answer>\nOrbit Staples\n</answer>", COT, False, "unclosed_think"),
    ("x\n<answer>\nOrbit Staples\n</answer>", COT, True, "unclosed_think"),
    ("<answer>Orbit Staples</answer><think>x</think>", COT, False, "no_answer"),
    ("<think>\nx\n</think>\n\nOrbit Staples", COT, False, "no_answer"),
    ("x\n</think>\n\n<answer>\nOrbit Staples", COT, True, "unclosed_answer"),
    ("x\n</think>\n\n<answer>\n \n</answer>", COT, True, "empty_answer"),
    # direct: a think block is parsed when the prompt or the completion opened one.
    ("Orbit Staples", CFG, True, "unclosed_think"),
    ("<think>\nOrbit Staples", CFG, False, "unclosed_think"),
    ("\n</think>\n\n", CFG, True, "empty_answer"),
    (" \n" + EOS_TOKEN, CFG, False, "empty_answer"),
  ],
)
def test_malformed_completions(completion, cfg, think_open, reason):
  assert parse_completion(completion, cfg, think_open=think_open) == ParsedCompletion((), reason)
  assert extract_titles(completion, cfg, think_open=think_open) is None
  assert reason in PARSE_REASONS


def test_parse_completion_accepts_a_full_think_block_and_ignores_text_after_the_answer():
  # A direct answer in DeepSeek's empty-think form also parses after a prompt that did not open think.
  assert extract_titles(EMPTY_THINK + "Orbit Staples", CFG) == ["Orbit Staples"]
  assert extract_titles("x</think>\n\n<answer>\nA\nB\n</answer> trailing", COT) == ["A", "B"]


def test_prompt_opens_think():
  assert prompt_opens_think("...<｜Assistant｜><think>\n")
  assert prompt_opens_think("<think>")
  assert not prompt_opens_think("...<｜Assistant｜>")
  assert not prompt_opens_think("Think inside <think></think>.\n\nAnswer: ")
  assert not prompt_opens_think("<think>\n</think>\n")


# --- the real DeepSeek-R1-Distill template (tests/r1_tokenizer.py) ----------------------------


def test_r1_prompt_and_sft_pair_exact(r1_tokenizer):
  tok = r1_tokenizer
  cfg = dataclasses.replace(CFG, max_history_tokens=10_000)
  prompt = build_prompt(EXAMPLE, CATALOG, tok, cfg)
  assert prompt == f"{BOS_TOKEN}{USER_TOKEN}{USER_TEXT}{ASSISTANT_TOKEN}<think>\n"
  assert prompt_opens_think(prompt)
  direct = build_sft_pair(EXAMPLE, CATALOG, tok, cfg)
  assert direct == SftPair(prompt, "\n</think>\n\nOrbit Staples", 3, 3)
  cot = build_sft_pair(EXAMPLE, CATALOG, tok, dataclasses.replace(COT, max_history_tokens=10_000))
  assert cot.prompt.endswith("inside <answer></answer>.<｜Assistant｜><think>\n")
  assert cot.completion == RATIONALE + "\n</think>\n\n<answer>\nOrbit Staples\n</answer>"  # no second <think>
  # The full assistant turn (prompt's "<think>\n" + completion) is the documented form.
  assert "<think>\n" + cot.completion == COT_TARGET
  assert parse_completion(cot.completion, COT, think_open=True).titles == ("Orbit Staples",)
  # A cot_template that does not start inside the opened block cannot be trained after it.
  with pytest.raises(ValueError, match="cot_template must start with"):
    build_sft_pair(EXAMPLE, CATALOG, tok, dataclasses.replace(COT, cot_template="{rationale}<answer>{answer}</answer>"))


def test_r1_plain_template_prompt_gets_the_bos_the_model_expects(r1_tokenizer):
  tok = r1_tokenizer
  plain = dataclasses.replace(CFG, use_chat_template=False)
  prompt = build_prompt(EXAMPLE, CATALOG, tok, plain)
  assert not prompt_opens_think(prompt)
  ids = encode_prompt(tok, prompt)
  assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # add_bos_token: true
  chat_ids = encode_prompt(tok, build_prompt(EXAMPLE, CATALOG, tok, CFG))
  assert chat_ids.count(tok.bos_token_id) == 1  # the template wrote it; encode must not add another
  assert tok.encode(build_prompt(EXAMPLE, CATALOG, tok, CFG))[:2] == [tok.bos_token_id] * 2  # the trap


LONG = Example("u", ("A", "B", "C", "D", "E") * 6, ("A",))


@pytest.mark.parametrize("target_format", ["direct", "cot"])
def test_sft_pair_budgets_history_to_max_length(r1_tokenizer, target_format):
  tok = r1_tokenizer
  cfg = PromptConfig(history_attributes=("brand",), target_format=target_format)  # 512 history tokens
  full = build_sft_pair(LONG, CATALOG, tok, cfg)
  assert (full.history_kept, full.history_total) == (30, 30)

  def length(pair):  # tokens of prompt + completion + eos
    return len(encode_prompt(tok, pair.prompt)) + count_tokens(pair.completion, tok) + 1

  max_length = length(full) - 60  # 61 tokens too many for the whole history
  pair = build_sft_pair(LONG, CATALOG, tok, cfg, max_length=max_length)
  assert 1 < pair.history_kept < 30 and pair.history_total == 30 and pair.history_truncated
  assert length(pair) <= max_length + 1
  # Tight: one more history item would not have fitted.
  one_more = build_sft_pair(dataclasses.replace(LONG, history=LONG.history[-(pair.history_kept + 1):]),
                            CATALOG, tok, cfg)
  assert length(one_more) > max_length + 1
  # The BOS, the template header and the instruction survive; the newest item is the last line.
  assert pair.prompt.startswith(f"{BOS_TOKEN}{USER_TOKEN}Purchase history (oldest first):\n1. ")
  answer_format = (cfg.cot_answer_format if target_format == "cot" else cfg.direct_answer_format).format(noun="title")
  assert pair.prompt.endswith(f"{cfg.instruction} {answer_format}{ASSISTANT_TOKEN}<think>\n")
  assert f"{pair.history_kept}. Orbit Staples (brand: Orbit)\n\n" in pair.prompt
  # A generous max_length changes nothing; so does having no tokenizer (nothing to count with).
  assert build_sft_pair(LONG, CATALOG, tok, cfg, max_length=length(full) - 1) == full
  assert build_sft_pair(LONG, CATALOG, None, cfg, max_length=10) == build_sft_pair(LONG, CATALOG, None, cfg)


def test_config_validation():
  with pytest.raises(ValueError, match="target_format"):
    PromptConfig(target_format="json")
  with pytest.raises(ValueError, match="item_delimiter"):
    PromptConfig(item_delimiter="")
  with pytest.raises(ValueError, match="max_history_tokens"):
    PromptConfig(max_history_tokens=-1)
  hash(PromptConfig(history_attributes=["brand"]))
