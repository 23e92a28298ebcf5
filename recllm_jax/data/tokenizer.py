"""The tokenizer interface the data code relies on, prompt encoding, and an offline BPE.

Real runs use the pretrained model's tokenizer. Offline (no hub access) we
still need a tokenizer with the same *interface* as DeepSeek-R1-Distill-Qwen:
the same special tokens and reasoning tags and an equivalent chat template, so
prompts, SFT masks, GRPO format rewards and constrained decoding behave the
same as with the real one. Byte-level BPE never produces unknown tokens, so
any catalog title can be encoded and decoded exactly.

Every rendered prompt is encoded by :func:`encode_prompt`, the one place that
decides about the BOS token: the real R1 template writes the BOS itself *and*
its tokenizer config has ``add_bos_token: true``, so a plain
``encode(prompt)`` would start with two BOS tokens.

``transformers`` and ``tokenizers`` are imported only to train a tokenizer, so
the prompt code can import this module cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
  import transformers

__all__ = [
  "Tokenizer",
  "encode_prompt",
  "adds_bos",
  "train_bpe_tokenizer",
  "BOS_TOKEN",
  "EOS_TOKEN",
  "PAD_TOKEN",
  "USER_TOKEN",
  "ASSISTANT_TOKEN",
  "REASONING_TOKENS",
  "CHAT_TEMPLATE",
]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# Not "special": they must survive decode(skip_special_tokens=True) so rewards can parse them.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


class Tokenizer(Protocol):
  """The part of a `transformers` tokenizer the data code uses (prompts, pipeline, previews)."""

  bos_token_id: int | None
  eos_token_id: int | None
  pad_token_id: int | None
  chat_template: Any

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

  def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...

  def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def adds_bos(tokenizer: Tokenizer) -> bool:
  """Whether ``encode(text)`` (special tokens on) starts plain text with the BOS token."""
  bos = getattr(tokenizer, "bos_token_id", None)
  return bos is not None and list(tokenizer.encode("", add_special_tokens=True))[:1] == [bos]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
  """Token ids of a rendered prompt, starting with exactly one BOS when the model expects one.

  The text is encoded without special tokens; the BOS is then prepended only if the
  tokenizer adds one to plain text (``add_bos_token``) and the prompt does not already
  start with it (a chat template that writes ``{{ bos_token }}``). So a chat-template
  prompt and a plain-template prompt both get one BOS under the real R1 tokenizer, and
  none under a tokenizer that never adds one (Qwen2, the offline BPE). Nothing is
  appended: completions get their EOS from the data pipeline.
  """
  ids = list(tokenizer.encode(prompt, add_special_tokens=False))
  bos = getattr(tokenizer, "bos_token_id", None)
  if ids[:1] != [bos] and adds_bos(tokenizer):
    ids.insert(0, bos)
  return ids


# Shaped like DeepSeek-R1-Distill-Qwen's template: bos, system prompt, then
# <｜User｜>/<｜Assistant｜> turns; finished assistant turns end with eos. Unlike
# the original, assistant turns are rendered verbatim (the original strips
# text before </think>) so a full SFT sequence renders exactly as trained on,
# and the generation prompt does not force "<think>\n" (direct-answer
# prompts must be possible). `recllm_jax.data.prompts` builds and parses targets
# for both this template and the real one (see `prompt_opens_think`).
CHAT_TEMPLATE = (
  "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
  "{% set ns = namespace(system_prompt='') %}"
  "{% for message in messages %}{% if message['role'] == 'system' %}"
  "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
  "{{ bos_token }}{{ ns.system_prompt }}"
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}{{ '" + USER_TOKEN + "' + message['content'] }}"
  "{% elif message['role'] == 'assistant' %}"
  "{{ '" + ASSISTANT_TOKEN + "' + message['content'] + '" + EOS_TOKEN + "' }}"
  "{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "' }}{% endif %}"
)


def train_bpe_tokenizer(
  texts: Iterable[str],
  out_dir: str | os.PathLike[str],
  *,
  vocab_size: int = 2048,
  chat_template: bool = True,
  min_frequency: int = 2,
  added_tokens: Sequence[str] = (),
) -> transformers.PreTrainedTokenizerFast:
  """Train a byte-level BPE on ``texts``, save it to ``out_dir`` and return it.

  ``added_tokens`` (e.g. semantic-ID item tokens ``<a_12>``) get ids after the BPE and the
  reasoning tags, on top of ``vocab_size``. Like the reasoning tags they are added, not special,
  not normalized: each encodes to exactly one id wherever it appears (also glued to text or to
  each other, ``"1. <a_1><b_2>"``), and ``decode(skip_special_tokens=True)`` keeps them.

  Nothing is added automatically on ``encode`` (like Qwen2 tokenizers):
  the chat template emits bos itself, and the data pipeline appends eos to
  completions, so no token is ever doubled. Reload with
  ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
  """
  import tokenizers
  import transformers
  from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX)

  n_fixed = 256 + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
  if vocab_size < n_fixed:
    raise ValueError(f"vocab_size must be >= {n_fixed} (bytes + special tokens), got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  # Qwen2's own normalizer and pre-tokenizer (digits split one by one), so that an exported
  # checkpoint's tokenizer, which transformers rebuilds as `Qwen2Tokenizer` with these rules,
  # encodes exactly as in training.
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - len(REASONING_TOKENS),
    min_frequency=min_frequency,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
  extra = [t for t in dict.fromkeys(added_tokens) if t not in REASONING_TOKENS]
  if extra:
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])

  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
    model_max_length=1 << 20,
  )
  if chat_template:
    hf.chat_template = CHAT_TEMPLATE
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf.save_pretrained(out)
  return hf
