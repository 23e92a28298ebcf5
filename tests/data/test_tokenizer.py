"""BPE tokenizer training, reloading, the R1-style chat template, and prompt encoding (BOS)."""

from __future__ import annotations

import pytest
import transformers

from recllm_jax.data import read_jsonl
from recllm_jax.data.tokenizer import (
  ASSISTANT_TOKEN,
  BOS_TOKEN,
  EOS_TOKEN,
  PAD_TOKEN,
  REASONING_TOKENS,
  USER_TOKEN,
  adds_bos,
  encode_prompt,
  train_bpe_tokenizer,
)


def test_special_tokens(trained_tokenizer):
  tok = trained_tokenizer
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
  ids = [tok.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, *REASONING_TOKENS)]
  assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids
  assert tok.eos_token_id == ids[1] and tok.pad_token_id == ids[2]
  for tag in REASONING_TOKENS:  # one token each, and kept when special tokens are skipped
    assert len(tok.encode(tag, add_special_tokens=False)) == 1
  text = "<think>\nbecause</think>\n<answer>Orbit Staples</answer>"
  assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == text
  assert len(tok) <= 1024


def test_roundtrip_and_no_implicit_special_tokens(trained_tokenizer, synthetic_dir):
  tok = trained_tokenizer
  titles = read_jsonl(synthetic_dir).catalog.titles()
  for title in titles[:50] + ["Ünïcödé — “quotes” 12½\n\ttabs"]:
    ids = tok.encode(title)  # default add_special_tokens=True must not add bos/eos
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == title
  # Titles seen in training compress well below one token per character.
  assert len(tok.encode(titles[0])) < len(titles[0]) / 2


def test_chat_template(trained_tokenizer):
  tok = trained_tokenizer
  messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}]
  rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == f"{BOS_TOKEN}SYS{USER_TOKEN}hi{ASSISTANT_TOKEN}"
  full = tok.apply_chat_template(messages[1:] + [{"role": "assistant", "content": "<think>x</think>y"}], tokenize=False)
  assert full == f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}<think>x</think>y{EOS_TOKEN}"
  ids = tok.encode(rendered, add_special_tokens=False)
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids(ASSISTANT_TOKEN)


def test_save_and_reload_without_template(tmp_path):
  texts = ["Acme Gel Pen, Blue, 12-Pack", "Orbit Stapler, Red", "Orbit Staples, 1000-Count"] * 50
  tok = train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=300, chat_template=False)
  assert tok.chat_template is None
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  assert reloaded.chat_template is None
  assert reloaded.encode("Orbit Stapler") == tok.encode("Orbit Stapler")
  assert reloaded.eos_token == EOS_TOKEN
  with pytest.raises(ValueError, match="vocab_size"):
    train_bpe_tokenizer(texts, tmp_path / "small", vocab_size=100)


def test_encode_prompt_never_doubles_bos(trained_tokenizer, r1_tokenizer):
  # The offline BPE adds nothing on encode: the chat template's BOS is the only one, and a
  # plain prompt gets none (as with Qwen2 tokenizers).
  tok = trained_tokenizer
  assert not adds_bos(tok)
  assert encode_prompt(tok, f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}") == tok.encode(
    f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}", add_special_tokens=False)
  assert tok.bos_token_id not in encode_prompt(tok, "hi\n\nAnswer: ")
  # The real R1 config adds a BOS on encode (add_bos_token: true) and its template writes one.
  r1 = r1_tokenizer
  assert adds_bos(r1)
  rendered = r1.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
  assert rendered == f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}<think>\n"
  assert r1.encode(rendered)[:2] == [r1.bos_token_id] * 2  # what a plain encode would train on
  ids = encode_prompt(r1, rendered)
  assert ids == r1.encode(rendered, add_special_tokens=False) and ids.count(r1.bos_token_id) == 1
  assert encode_prompt(r1, "hi") == [r1.bos_token_id, *r1.encode("hi", add_special_tokens=False)]
