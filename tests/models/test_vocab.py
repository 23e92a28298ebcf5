"""Added tokens (semantic-ID item codes): tokenizers, vocabulary growth, training, export."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recllm_jax
from recllm_jax import sharding
from recllm_jax.models import PRESETS, Qwen2ForCausalLM, grow_vocab, padded_vocab_size
from recllm_jax.models.vocab import vocab_size_for
from recllm_jax.train import build

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
from test_loop import make_config  # noqa: E402  (the small SFT setup of the loop tests)

_spec = importlib.util.spec_from_file_location("export_hf_script",
                                              REPO / "scripts" / "export_hf.py")
export_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_script)

# Item codes as the codec writes them: one added token per code level.
SID_TOKENS = tuple(f"<{level}_{i}>" for level in "abc" for i in range(12)) + ("<d_0>", "<d_1>")
HF_VOCAB = 256  # rows of the tiny HF checkpoint: fewer than the tokenizer's tokens
CORPUS = ["Acme Gel Pen, Blue, 12-Pack", "Orbit Stapler", "Paper Notebook, 3 Pack",
          "Purchase history:", "1. Acme Gel Pen\n2. Orbit Stapler\nNext:"] * 4


def _tiny(vocab_size: int = 200, tied: bool = False):
  return PRESETS["tiny"](vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)


def _model(cfg, seed: int = 0, mesh=None) -> Qwen2ForCausalLM:
  """A random model, initialised under jit (eager init of every small op is ~10x slower)."""
  return sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed)), mesh)


_logits = nnx.jit(lambda model, ids: model(ids))  # [B, T] -> [B, T, V]


def _with(config, **values):
  """`config` with top-level keys an SFT config lacks (e.g. `init_from`)."""
  with config.unlocked():
    for key, value in values.items():
      config[key] = value
  return config


def _rows(model) -> dict[str, np.ndarray]:
  """The vocab-axis weights as host arrays, vocab first: [V, D]."""
  rows = {"embed": np.asarray(model.embed_tokens.embedding[...])}
  if not model.cfg.tie_word_embeddings:
    rows["head"] = np.asarray(model.lm_head.kernel[...]).T
  return rows


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A catalog BPE (Qwen2 rules) with the item tokens added (300 + 38 tokens), reloaded from its
  directory as runs load it (`name_or_path` is that directory)."""
  import transformers

  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  path = tmp_path_factory.mktemp("bpe")
  trained = train_bpe_tokenizer(CORPUS, path, vocab_size=300, min_frequency=1,
                                added_tokens=SID_TOKENS)
  _assert_single_ids(trained)
  return transformers.AutoTokenizer.from_pretrained(path)


def _hf_tokenizer(path: Path):
  """A small pretrained-style `PreTrainedTokenizerFast` (as an HF checkpoint ships one)."""
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=290, special_tokens=["<eos>", "<pad>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                       pad_token="<pad>").save_pretrained(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def _assert_single_ids(tokenizer) -> None:
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SID_TOKENS}
  assert len(set(ids.values())) == len(SID_TOKENS)
  for t, i in ids.items():
    assert tokenizer.encode(t, add_special_tokens=False) == [i], t
  text = "1. <a_1><b_2><c_3>\n2. <a_10><b_11><c_0><d_1> Pen<a_2>x"
  encoded = tokenizer.encode(text, add_special_tokens=False)
  assert [i for i in encoded if i in ids.values()] == [
      ids[t] for t in ("<a_1>", "<b_2>", "<c_3>", "<a_10>", "<b_11>", "<c_0>", "<d_1>", "<a_2>")]
  assert tokenizer.decode(encoded, skip_special_tokens=True) == text


# --- growth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_growth_keeps_old_rows_and_logits(tied):
  model = _model(_tiny(tied=tied))
  assert grow_vocab(model, 200) is model and grow_vocab(model, 100) is model  # no-op
  grown = grow_vocab(model, 256, seed=3)
  assert grown.cfg == model.cfg.replace(vocab_size=256)
  before, after = _rows(model), _rows(grown)
  assert before.keys() == after.keys() == ({"embed"} if tied else {"embed", "head"})
  for name in before:
    assert after[name].shape == (256, 64)
    np.testing.assert_array_equal(after[name][:200], before[name])  # bit-identical
  ids = jnp.array([[5, 17, 3, 199, 42, 0, 7, 9]])
  # Same logits for the old tokens, up to float rounding: a wider [D, V] matmul may be tiled
  # differently (a few ulp, seen with the tied head).
  np.testing.assert_allclose(np.asarray(_logits(grown, ids))[..., :200],
                             np.asarray(_logits(model, ids)),
                             rtol=0, atol=1e-6)
  # Deterministic in the seed, different across seeds.
  again, other = _rows(grow_vocab(model, 256, seed=3)), _rows(grow_vocab(model, 256, seed=4))
  np.testing.assert_array_equal(again["embed"], after["embed"])
  assert not np.array_equal(other["embed"][200:], after["embed"][200:])


def test_new_rows_are_the_mean_plus_scaled_noise():
  model = _model(_tiny(vocab_size=512), seed=1)
  # Give every dimension its own mean and spread, so per-dimension statistics are what's tested.
  d = np.arange(64)
  embed = np.random.default_rng(0).normal(0.1 * np.sin(d), 0.01 + 0.002 * d, (512, 64))
  model.embed_tokens.embedding.set_value(jnp.asarray(embed, jnp.float32))
  grown = grow_vocab(model, 512 + 4096, seed=0, noise_scale=0.5)
  for name, rows in _rows(grown).items():
    old, new = rows[:512].astype(np.float64), rows[512:].astype(np.float64)
    mean, std = old.mean(0), old.std(0)  # [D]
    z = (new - mean) / (0.5 * std)  # standard normal if the init is as documented
    np.testing.assert_allclose(z.mean(0), 0, atol=5 / np.sqrt(4096))  # ~5 sigma
    np.testing.assert_allclose(z.std(0), 1, atol=0.08)
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.08, name  # independent noise


def test_sharded_growth_keeps_shardings_on_the_mesh():
  mesh = sharding.make_mesh(1, 4, 2)
  model = _model(_tiny(256), mesh=mesh)
  specs = lambda m: {k: v.get_value().sharding.spec
                     for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  before = specs(model)
  assert before[("embed_tokens", "embedding")] == jax.sharding.PartitionSpec("tensor", "fsdp")
  grown = grow_vocab(model, padded_vocab_size(300))
  assert grown.cfg.vocab_size == 320 and specs(grown) == before
  kept = grown.layers[0].mlp.up_proj.kernel[...]
  assert kept is model.layers[0].mlp.up_proj.kernel[...]  # untouched params are not copied
  odd = grow_vocab(model, 257)  # 257 rows cannot split over tensor=2: that axis replicates
  assert odd.embed_tokens.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  ids = jnp.tile(jnp.arange(8)[None], (8, 1)) * 31  # [8, 8] batch over the 4 x 2 mesh
  with jax.set_mesh(mesh):
    old, new = np.asarray(_logits(model, ids)), np.asarray(_logits(grown, ids))
  np.testing.assert_allclose(new[..., :256], old, rtol=0, atol=1e-6)
  old_rows, new_rows = _rows(model), _rows(grown)
  for name in old_rows:
    np.testing.assert_array_equal(new_rows[name][:256], old_rows[name])


def test_vocab_size_for_uses_spare_rows_then_pads_to_64():
  assert vocab_size_for(151936, 151665) == 151936  # R1: its spare rows suffice
  assert vocab_size_for(151936, 151665 + 271) == 151936
  assert vocab_size_for(151936, 151665 + 1000) == 152704 == padded_vocab_size(152665)
  assert padded_vocab_size(320) == 320 and padded_vocab_size(321) == 384


# --- tokenizers --------------------------------------------------------------------------------


def test_bpe_added_tokens_are_single_ids(bpe):
  assert len(bpe) == 300 + len(SID_TOKENS)
  assert bpe.convert_tokens_to_ids("<a_0>") == 300  # after the BPE and the reasoning tags
  assert not set(SID_TOKENS) & set(bpe.all_special_tokens)  # kept by skip_special_tokens
  _assert_single_ids(bpe)


def test_hf_tokenizer_gets_the_tokens_saved_into_the_workdir(tmp_path):
  base = _hf_tokenizer(tmp_path / "hf_tok")
  config = make_config(tmp_path / "w", tmp_path,
                       **{"model.tokenizer_path": str(tmp_path / "hf_tok")})
  workdir = tmp_path / "w"
  # Without new tokens: the pretrained tokenizer as is, nothing written.
  assert build.load_tokenizer(config, workdir).get_vocab() == base.get_vocab()
  assert not (workdir / build.TOKENIZER_DIR).exists()

  tokenizer = build.load_tokenizer(config, workdir, new_tokens=SID_TOKENS)
  assert len(tokenizer) == len(base) + len(SID_TOKENS)
  assert tokenizer.convert_tokens_to_ids(list(SID_TOKENS)) == list(
      range(len(base), len(tokenizer)))
  _assert_single_ids(tokenizer)
  assert (workdir / build.TOKENIZER_DIR / "tokenizer.json").is_file()
  # Resume, evaluate, export (no new_tokens given) and a repeat all read the same ids.
  for again in (build.load_tokenizer(config, workdir),
                build.load_tokenizer(config, workdir, new_tokens=SID_TOKENS[::-1])):
    assert again.get_vocab() == tokenizer.get_vocab()
    _assert_single_ids(again)
  # A later token is appended after the saved ones (old ids never move).
  more = build.load_tokenizer(config, workdir, new_tokens=(*SID_TOKENS, "<d_2>"))
  assert more.convert_tokens_to_ids("<d_2>") == len(tokenizer)
  assert build.load_tokenizer(config, workdir).get_vocab() == more.get_vocab()


# --- build, train, restore, plan ----------------------------------------------------------------


def test_hf_weights_grow_to_the_tokenizer(tmp_path, hf_checkpoint):
  hf_dir, _ = hf_checkpoint(vocab_size=HF_VOCAB)
  mesh = sharding.make_mesh()
  for key in ("model.hf_path", "init_from"):
    config = (make_config(tmp_path / key, tmp_path, **{"model.preset": "hf",
                                                       "model.hf_path": str(hf_dir)})
              if key == "model.hf_path" else
              _with(make_config(tmp_path / key, tmp_path), init_from=str(hf_dir)))
    fits = build.build_model(config, mesh, [f"t{i}" for i in range(HF_VOCAB)])
    assert fits.cfg.vocab_size == HF_VOCAB  # enough rows: not grown
    grown = build.build_model(config, mesh, [f"t{i}" for i in range(HF_VOCAB + 1)])
    assert grown.cfg.vocab_size == HF_VOCAB + 64
    for name, rows in _rows(fits).items():
      np.testing.assert_array_equal(_rows(grown)[name][:HF_VOCAB], rows)


@pytest.mark.slow  # ~15 s: a whole grown-vocabulary run; the unit tests above stay default
@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw restore below
def test_grown_hf_run_trains_resumes_restores_and_plans(tmp_path, hf_checkpoint, bpe):
  import orbax.checkpoint as ocp

  from recllm_jax import plan
  from recllm_jax.data.synthetic import generate_synthetic
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.loop import train

  data = generate_synthetic(tmp_path / "data", num_items=30, num_users=30, seed=0)
  hf_dir, _ = hf_checkpoint(vocab_size=HF_VOCAB)
  workdir = tmp_path / "sft"
  overrides = {"model.preset": "hf", "model.hf_path": str(hf_dir),
               "model.tokenizer_path": bpe.name_or_path, "train.num_steps": 2,
               "train.checkpoint_every": 2, "train.log_every": 0}
  train(make_config(workdir, data, **overrides))
  rows = padded_vocab_size(len(bpe))
  assert rows == 384 > HF_VOCAB
  assert build.saved_vocab_size(workdir) == rows

  # Resume: the HF model is grown to the same shapes and the checkpoint restores into them.
  train(make_config(workdir, data, **{**overrides, "train.num_steps": 3}))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]

  model, tokenizer, _ = build.load_checkpoint(workdir)
  assert model.cfg.vocab_size == rows and tokenizer.get_vocab() == bpe.get_vocab()
  saved = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "3" / "state")["params"]
  flat = {tuple(map(str, k)): v.get_value()
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  saved_flat = {tuple(str(p.key) for p in path if getattr(p, "key", "value") != "value"): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  assert saved_flat.keys() == flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(saved_flat[key]), str(key))

  # scripts/export_hf.py's path: the grown rows and the added tokens go out together.
  out = recllm_jax.export_hf(model, tmp_path / "export", tokenizer)
  assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
  assert export_script.tokenizer_mismatch(out, tokenizer) is None

  # GRPO-style init_from the workdir: the grown architecture, without growing again ...
  mesh = sharding.make_mesh()
  child = _with(make_config(tmp_path / "grpo", data), init_from=str(workdir))
  assert build.build_model(child, mesh, tokenizer).cfg.vocab_size == rows
  # ... and a tokenizer beyond its rows is still an error for a trained workdir.
  with pytest.raises(ConfigError, match=f"only {rows} embeddings"):
    build.build_model(child, mesh, [f"t{i}" for i in range(rows + 1)])

  # The planner counts the grown rows, from the tokenizer or from the checkpoint.
  params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  one = dict(num_devices=1, mesh_shape=(1, 1, 1))
  assert plan.plan(make_config(tmp_path / "p1", data, **overrides), **one).params == params
  child = _with(make_config(tmp_path / "p2", data), init_from=str(workdir))
  assert plan.plan(child, **one).params == params
  # ... and the item tokens a run will add to a pretrained tokenizer (`new_tokens`).
  base = len(_hf_tokenizer(tmp_path / "hf_tok"))
  config = make_config(tmp_path / "p3", data, **{**overrides,
                                                 "model.tokenizer_path": str(tmp_path / "hf_tok")})
  planned = plan.plan(config, new_tokens=len(SID_TOKENS), **one)
  built = build.build_model(config, mesh, build.load_tokenizer(config, tmp_path / "p3",
                                                               new_tokens=SID_TOKENS))
  assert planned.model.vocab_size == built.cfg.vocab_size == 384
  assert planned.model == plan.model_config_for(config, len(SID_TOKENS))[0]
  assert plan.model_config_for(config)[0].vocab_size == vocab_size_for(HF_VOCAB, base)


# --- export ------------------------------------------------------------------------------------


def _greedy_jax(model, prompts: list[list[int]], eos: int, pad: int, steps: int):
  width = max(map(len, prompts))
  ids = np.array([[pad] * (width - len(p)) + p for p in prompts], np.int32)
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
  out = recllm_jax.generate(model, ids, mask, max_new_tokens=steps, eos_token_id=eos,
                            pad_token_id=pad)
  return [row[:row.index(eos) + 1] if eos in row else row
          for row in np.asarray(out.tokens).tolist()]


def test_export_of_a_grown_model_generates_item_tokens_in_transformers(tmp_path, hf_checkpoint,
                                                                       bpe):
  import torch
  import transformers

  from recllm_jax.models.qwen2_hf import load_hf_model

  hf_dir, _ = hf_checkpoint(vocab_size=HF_VOCAB)
  model = grow_vocab(load_hf_model(hf_dir), padded_vocab_size(len(bpe)), seed=0)
  first = bpe.convert_tokens_to_ids(SID_TOKENS[0])
  # Make greedy decoding emit item tokens: large random LM-head columns and embeddings for them
  # (the padding rows past the tokenizer keep their mean init and are never picked).
  rng = np.random.default_rng(0)
  kernel = np.array(model.lm_head.kernel[...])  # [D, V]
  kernel[:, first:len(bpe)] = rng.normal(0, 0.5, (kernel.shape[0], len(bpe) - first))
  model.lm_head.kernel.set_value(jnp.asarray(kernel))
  embed = np.array(model.embed_tokens.embedding[...])  # [V, D]
  embed[first:len(bpe)] = rng.normal(0, 1.0, (len(bpe) - first, embed.shape[1]))
  model.embed_tokens.embedding.set_value(jnp.asarray(embed))

  out = recllm_jax.export_hf(model, tmp_path / "export", bpe)
  assert json.loads((out / "config.json").read_text())["vocab_size"] == 384
  loaded_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert loaded_tok.convert_tokens_to_ids(list(SID_TOKENS)) == bpe.convert_tokens_to_ids(
      list(SID_TOKENS))
  _assert_single_ids(loaded_tok)
  probes = export_script.added_token_probes(bpe)
  assert probes[0].startswith("1. <think></think><answer></answer><a_0><a_1>")
  assert export_script.tokenizer_mismatch(out, bpe) is None

  texts = ["1. <a_1><b_2><c_3>\n2.", "Acme Gel Pen <a_4>", "Next:"]
  prompts = [bpe.encode(t, add_special_tokens=False) for t in texts]
  eos, pad, steps = bpe.eos_token_id, bpe.pad_token_id, 12
  expected = _greedy_jax(model, prompts, eos, pad, steps)
  emitted = {t for row in expected for t in row if first <= t < len(bpe)}
  assert len(emitted) >= 4, expected  # the new rows are really exercised

  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert hf.get_input_embeddings().weight.shape[0] == 384
  for prompt, want in zip(prompts, expected):
    with torch.no_grad():
      got = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                        max_new_tokens=steps, do_sample=False, eos_token_id=eos,
                        pad_token_id=pad)
    assert got[0, len(prompt):].tolist() == want
  # And back: the export loads as the same grown model, which decodes the same.
  back = load_hf_model(out)
  assert back.cfg.vocab_size == 384
  for name, rows in _rows(model).items():
    np.testing.assert_array_equal(_rows(back)[name], rows)
  assert _greedy_jax(back, prompts, eos, pad, steps) == expected
