"""Export a trained run as a Hugging Face checkpoint directory.

  python scripts/export_hf.py --workdir W --out O [--step N] [--dtype bfloat16]

Works for any SFT or GRPO workdir: the params at `--step` (default: the latest checkpoint) are
written with the run's tokenizer as `config.json`, `generation_config.json`, safetensors and
tokenizer files, which `transformers.AutoModelForCausalLM.from_pretrained(O)` (and vLLM, or
`recllm_jax.load_hf_model`) load directly. Only params are read: the optimizer state stays on
disk, so exporting needs about the model's size in memory.

A run that added tokens to its tokenizer (semantic-ID item codes) exports its grown vocabulary:
`config.json`'s `vocab_size` is the checkpoint's row count and the tokenizer carries the added
tokens, each still one id after the reload.

A user error (a missing workdir or step, an `--out` that would overwrite a run) ends with one
line `error: ...` on stderr and exit status 2, like scripts/train.py.

After writing, the tokenizer is reloaded the way users will load it (`AutoTokenizer`) and
compared with the run's; a difference is reported as a `warning:` line (see
`tokenizer_mismatch`), since the weights are still right and the exact tokenizer still loads
with `transformers.PreTrainedTokenizerFast.from_pretrained(O)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import fail  # noqa: E402  (scripts/train.py: the shared one-line user-error exit)

DTYPES = ("float32", "bfloat16", "float16")
# Texts where tokenizers' normalizers and pre-tokenizers differ: digit runs, space runs,
# newlines and tabs, compatibility characters (NFC vs none).
PROBE_TEXTS = ("Acme Gel Pen, Blue, 12-Pack of 2024", "  two  spaces\n\n\tand a tab ",
               "Caf\u00e9 \ufb01le \uff21\uff11\uff12")


def shard_size(text: str) -> int:
  """`--max_shard_size` in bytes, checked at parse time (not after loading the model)."""
  from recllm_jax.models.qwen2_hf import _parse_size

  try:
    return _parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, type=Path, help="a run's workdir")
  parser.add_argument("--out", required=True, type=Path, help="the HF directory to write")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to export (default: the latest)")
  parser.add_argument("--dtype", choices=DTYPES, default=None,
                      help="tensor dtype on disk (default: the run's model.param_dtype)")
  parser.add_argument("--max_shard_size", type=shard_size, default=2 * 10**9,
                      help="largest safetensors shard, e.g. 500MB (default: 2GB)")
  parser.error = fail  # argparse would print its usage too; keep every user error one line
  return parser.parse_args(argv)


def tokenizer_mismatch(out: Path, tokenizer: Any) -> str | None:
  """How `transformers.AutoTokenizer.from_pretrained(out)` differs from `tokenizer`, or None.

  transformers 5 loads the tokenizer of every `model_type: qwen2` checkpoint as
  `Qwen2Tokenizer`, which rebuilds the normalizer and pre-tokenizer with Qwen2's own rules (and
  adds `<|endoftext|>` as unk unless tokenizer_config.json sets `unk_token: null`); a tokenizer
  trained with other rules (e.g. a catalog BPE) then silently encodes text differently.
  """
  import transformers

  loaded = transformers.AutoTokenizer.from_pretrained(out)
  name = type(loaded).__name__
  vocab, expected = loaded.get_vocab(), tokenizer.get_vocab()
  if vocab != expected:
    differing = sorted(set(vocab.items()) ^ set(expected.items()))[:4]
    return (f"{name} has {len(vocab)} tokens and the run's tokenizer {len(expected)} "
            f"(differing entries: {differing})")
  for text in (*PROBE_TEXTS, *added_token_probes(tokenizer)):
    got, want = loaded(text)["input_ids"], tokenizer(text)["input_ids"]
    if got != want:
      return f"{name} encodes {text!r} as {got}, the run's tokenizer as {want}"
  return None


def added_token_probes(tokenizer: Any, count: int = 8) -> tuple[str, ...]:
  """Texts with the run's added non-special tokens (e.g. item codes `<a_12>`) glued to each
  other and to text, as prompts write them: each must stay one token after the reload."""
  special = set(tokenizer.all_special_tokens)
  added = sorted((i, t) for t, i in tokenizer.get_added_vocab().items() if t not in special)
  tokens = [t for _, t in added]
  if not tokens:
    return ()
  return (f"1. {''.join(tokens[:count])}\n", f"x{''.join(tokens[-count:])} y")


def check_paths(workdir: Path, out: Path) -> None:
  """Fails before any model is loaded when the paths cannot work."""
  if not workdir.is_dir():
    fail(f"--workdir={workdir}: no such directory")
  if not (workdir / "checkpoints").is_dir():
    fail(f"--workdir={workdir} has no checkpoints/ directory: is it a run's workdir, and did "
         "the run save a checkpoint?")
  # export_hf writes config.json, which in a workdir is the run config that resume reads.
  if out.resolve() == workdir.resolve() or (out / "checkpoints").exists():
    fail(f"--out={out} is a run's workdir; exporting there would overwrite its config.json")


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  check_paths(args.workdir, args.out)
  # Imported after the checks so that --help and path errors stay fast.
  from recllm_jax import export_hf, load_checkpoint
  from recllm_jax.errors import UserError

  try:
    model, tokenizer, _ = load_checkpoint(args.workdir, args.step)
    out = export_hf(model, args.out, tokenizer, dtype=args.dtype,
                    max_shard_size=args.max_shard_size)
  except UserError as e:
    fail(e)
  problem = tokenizer_mismatch(out, tokenizer)
  if problem:
    print(f"warning: transformers.AutoTokenizer.from_pretrained({str(out)!r}) is not the run's "
          f"tokenizer: {problem}. Load the exact one with "
          f"transformers.PreTrainedTokenizerFast.from_pretrained({str(out)!r}).", file=sys.stderr)
  print(out)


if __name__ == "__main__":
  main(sys.argv[1:])
