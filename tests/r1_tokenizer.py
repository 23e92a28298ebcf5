"""A stand-in for DeepSeek-R1-Distill-Qwen's tokenizer, built at test time.

Prompts, SFT masks, BOS handling and completion parsing must be checked against the real chat
template, whose generation prompt ends with "<｜Assistant｜><think>\\n" and which writes the BOS
itself while `add_bos_token: true` makes `encode` add another one. The real vocabulary (151k
tokens) is too big for the repo, so this builds a tiny byte-level BPE that carries the real
`tokenizer_config.json` verbatim (chat template, bos/eos/pad tokens, add_bos_token) and the real
special tokens of `special_tokens.json` (the think tags as ordinary added tokens, as in the
real tokenizer, so they survive `skip_special_tokens`). Token ids differ from the real ones;
tests read them from the tokenizer.

Importable from any test (tests/ is on sys.path through tests/conftest.py); tests/conftest.py
also exposes a ready one as the session fixture `r1_tokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

R1_REFERENCE_DIR = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "deepseek-r1-distill-qwen-1.5b"
).resolve()
THINK_TAGS = ("<think>", "</think>")

# Enough prompt-like text for a few hundred merges; the BPE is byte-level, so any text encodes.
CORPUS = (
    "User profile: age band: 25-34; occupation: teacher",
    "Purchase history (oldest first):",
    "1. Acme Gel Pen, Blue, 12-Pack (brand: Acme, category: Pens)",
    "2. Acme Spiral Notebook (brand: Acme, category: Notebooks)",
    "3. Orbit Stapler (brand: Orbit, category: Staplers)",
    "4. Orbit Staples (brand: Orbit, category: Staples)",
    "Based on this history, recommend the item the user is most likely to buy next.",
    "Reply with the exact title of the item and nothing else.",
    "Think briefly inside <think></think>, then give the exact title of the item inside <answer></answer>.",
    'The most recent item is "Orbit Stapler". Most frequent brand: Acme (2 of 3 recent items).',
    "The next item is likely: brand Orbit, category Staples.",
)


def build_r1_tokenizer(out_dir: str | os.PathLike[str], texts: Iterable[str] = CORPUS, *,
                       vocab_size: int = 400):
  """Train the stand-in into `out_dir` and return it reloaded with `AutoTokenizer`.

  Skips the calling test when the reference files are missing.
  """
  import transformers
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  if not (R1_REFERENCE_DIR / "tokenizer_config.json").exists():
    pytest.skip(f"DeepSeek-R1-Distill reference tokenizer files not found in {R1_REFERENCE_DIR}")
  config = json.loads((R1_REFERENCE_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
  real_ids = json.loads((R1_REFERENCE_DIR / "special_tokens.json").read_text(encoding="utf-8"))
  specials = [t for t in sorted(real_ids, key=real_ids.get) if t not in THINK_TAGS]

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TAGS), min_frequency=1,
                                special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts) * 3, trainer=trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TAGS])
  bos = config["bos_token"]
  if config.get("add_bos_token"):
    # What `add_bos_token: true` makes the real tokenizer do on encode(add_special_tokens=True).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])

  out = Path(out_dir)
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
  # The real config verbatim: it overrides whatever save_pretrained wrote.
  (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
  return transformers.AutoTokenizer.from_pretrained(out)


__all__ = ["CORPUS", "R1_REFERENCE_DIR", "build_r1_tokenizer"]
