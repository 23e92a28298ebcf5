"""Train a small byte-level BPE tokenizer for offline runs and tests.

Real runs use the pretrained model's tokenizer. Offline (no hub access) we
still need a tokenizer with the same *interface* as DeepSeek-R1-Distill-Qwen:
the same special tokens and reasoning tags and an equivalent chat template, so
prompts, SFT masks, GRPO format rewards and constrained decoding behave the
same as with the real one. Byte-level BPE never produces unknown tokens, so
any catalog title can be encoded and decoded exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
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

# Shaped like DeepSeek-R1-Distill-Qwen's template: bos, system prompt, then
# <｜User｜>/<｜Assistant｜> turns; finished assistant turns end with eos. Unlike
# the original, assistant turns are rendered verbatim (the original strips
# text before </think>) so a full SFT sequence renders exactly as trained on,
# and the generation prompt does not force "<think>\n" (direct-answer
# prompts must be possible).
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
) -> transformers.PreTrainedTokenizerFast:
  """Train a byte-level BPE on ``texts``, save it to ``out_dir`` and return it.

  Nothing is added automatically on ``encode`` (like Qwen2 tokenizers):
  the chat template emits bos itself, and the data pipeline appends eos to
  completions, so no token is ever doubled. Reload with
  ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
  """
  n_fixed = 256 + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
  if vocab_size < n_fixed:
    raise ValueError(f"vocab_size must be >= {n_fixed} (bytes + special tokens), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
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
