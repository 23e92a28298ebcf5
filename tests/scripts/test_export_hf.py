"""scripts/export_hf.py: a trained workdir exported for transformers decodes like the JAX model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import recllm_jax
from recllm_jax.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "train"))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)
from test_grpo import SFT, configure  # noqa: E402  (the fast tiny SFT setup)

_spec = importlib.util.spec_from_file_location("export_hf_script", REPO / "scripts" / "export_hf.py")
export_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_script)

STDERR = "export.stderr"  # the fixture's export run, kept for the warning check
PROMPTS = ["Next:", "Orbit Desk Next:", "Paper Stapler Pen Next:"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """A tiny SFT run with checkpoints at steps 30 and 60 (enough to emit varied text)."""
  from recllm_jax.train.loop import train

  root = tmp_path_factory.mktemp("export")
  data = generate_synthetic(root / "data", num_items=60, num_users=60, seed=0)
  run = root / "sft"
  train(configure(sft_configs.get_config("tiny"), workdir=str(run), **{"data.dir": str(data)},
                  **{**SFT, "train.num_steps": 60, "train.checkpoint_every": 30}))
  return run


def export(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), *args],
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("hf") / "model"
  done = export("--workdir", str(workdir), "--out", str(out))
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == [str(out)]
  (out / STDERR).write_text(done.stderr)
  return out


def encode(tokenizer, text: str, chat: bool) -> list[int]:
  if not chat:
    return tokenizer(text)["input_ids"]
  ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                      add_generation_prompt=True)
  return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _jax_greedy(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
  """Greedy completions of a left-padded batch, each cut after its first EOS."""
  width = max(map(len, prompts))
  ids = np.array([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], np.int32)
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
  out = recllm_jax.generate(model, ids, mask, max_new_tokens=NEW_TOKENS,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
  completions = []
  for row in np.asarray(out.tokens).tolist():
    end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    completions.append(row[:end])
  return completions


def test_transformers_decodes_the_export_like_the_jax_checkpoint(workdir, exported):
  import torch
  import transformers

  model, tokenizer, _ = recllm_jax.load_checkpoint(workdir)
  # Chat prompts as in training (they think, then answer), plain text (often ends at EOS early).
  prompts = [encode(tokenizer, text, chat) for text in PROMPTS for chat in (True, False)]
  expected = _jax_greedy(model, tokenizer, prompts)

  hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  for prompt, want in zip(prompts, expected):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                        max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, len(prompt):].tolist() == want, tokenizer.decode(prompt)
  # A trained model continues with text, not one repeated token (so the match means something).
  assert len({t for c in expected for t in c}) > 3, expected


def _same_tokenizer(loaded, tokenizer) -> None:
  assert loaded.get_vocab() == tokenizer.get_vocab()
  assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
      tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
  for text in [*PROMPTS, *export_script.PROBE_TEXTS]:
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
  for text in PROMPTS:
    assert encode(loaded, text, chat=True) == encode(tokenizer, text, chat=True), text


def test_exported_tokenizer_and_configs_are_the_runs(workdir, exported):
  import transformers

  _, tokenizer, _ = recllm_jax.load_checkpoint(workdir)
  _same_tokenizer(transformers.PreTrainedTokenizerFast.from_pretrained(exported), tokenizer)
  config = transformers.AutoConfig.from_pretrained(exported)
  generation = transformers.GenerationConfig.from_pretrained(exported)
  assert config.vocab_size == len(tokenizer)  # a catalog-trained tokenizer sizes the model
  assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
      tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_auto_tokenizer_loads_the_runs_tokenizer(workdir, exported):
  import transformers

  _, tokenizer, _ = recllm_jax.load_checkpoint(workdir)
  _same_tokenizer(transformers.AutoTokenizer.from_pretrained(exported), tokenizer)
  assert "warning:" not in (exported / STDERR).read_text()


def _bpe_dir(path: Path, qwen2_rules: bool):
  """A tiny byte-level BPE saved next to a qwen2 config.json, and its exact reload."""
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

  tok = Tokenizer(models.BPE())
  if qwen2_rules:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:  # GPT-2's regex keeps digit runs together, Qwen2's splits them
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([*export_script.PROBE_TEXTS, "12 2024 1234"] * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<eos>", "<pad>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                       pad_token="<pad>").save_pretrained(path)
  transformers.Qwen2Config(vocab_size=300).save_pretrained(path)
  return transformers.PreTrainedTokenizerFast.from_pretrained(path)


def test_tokenizer_mismatch_names_what_autotokenizer_changes(tmp_path):
  gpt2 = _bpe_dir(tmp_path / "gpt2", qwen2_rules=False)
  assert "Qwen2Tokenizer has 301 tokens and the run's tokenizer 300 (differing entries: " \
         "[('<|endoftext|>', 300)])" in export_script.tokenizer_mismatch(tmp_path / "gpt2", gpt2)
  qwen2 = _bpe_dir(tmp_path / "qwen2", qwen2_rules=True)
  assert "Qwen2Tokenizer has 301 tokens" in export_script.tokenizer_mismatch(tmp_path / "qwen2",
                                                                            qwen2)
  for name, tokenizer in (("gpt2", gpt2), ("qwen2", qwen2)):  # what export_hf should write
    config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
    (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": None}))
  assert export_script.tokenizer_mismatch(tmp_path / "qwen2", qwen2) is None
  message = export_script.tokenizer_mismatch(tmp_path / "gpt2", gpt2)
  assert message.startswith("Qwen2Tokenizer encodes 'Acme Gel Pen, Blue, 12-Pack of 2024' as "), \
      message


def test_bfloat16_export_of_an_earlier_step(workdir, tmp_path):
  done = export("--workdir", str(workdir), "--out", str(tmp_path / "bf16"), "--step", "30",
                "--dtype", "bfloat16")
  assert done.returncode == 0, done.stderr[-3000:]
  tensors = load_file(tmp_path / "bf16" / "model.safetensors")
  assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
  embed = tensors["model.embed_tokens.weight"]
  # The step-30 params, rounded to bf16 (and not the latest step's).
  for step, same in ((30, True), (60, False)):
    model, _, _ = recllm_jax.load_checkpoint(workdir, step)
    want = np.asarray(model.embed_tokens.embedding[...])
    assert np.array_equal(embed, want.astype(ml_dtypes.bfloat16)) == same, step


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{tmp}/missing"], "error: --workdir={tmp}/missing: no such directory"),
    (["--workdir", "{run}", "--step", "7"],
     "error: ConfigError: {run}@7: no such checkpoint; saved steps are [30, 60]"),
    (["--workdir", "{run}", "--out", "{run}"],
     "error: --out={run} is a run's workdir; exporting there would overwrite its config.json"),
])
def test_user_errors_are_one_line(workdir, tmp_path, args, message):
  fill = lambda s: s.format(tmp=tmp_path, run=workdir)
  argv = [fill(a) for a in args]
  done = export(*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "out")]))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [fill(message)]
  assert not (tmp_path / "out").exists()
