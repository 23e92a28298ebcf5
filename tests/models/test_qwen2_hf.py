"""HF safetensors load/export: parity, sharded checkpoints, round trips and error paths."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import recllm_jax
from recllm_jax import CheckpointError
from recllm_jax.models.qwen2_hf import WEIGHT_MAP, flax_to_hf_name, hf_to_flax_name
from recllm_jax.models import ConfigError

IDS = np.array([[5, 9, 17, 33, 64, 100, 7], [0, 0, 0, 12, 45, 99, 3]])
MASK = (IDS != 0).astype(np.int32)


def _torch_logits(model, ids=IDS, mask=MASK):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()


def _jax_logits(model, ids=IDS, mask=MASK):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def test_weight_map_round_trips_every_name():
  for flax_path in ["embed_tokens.embedding", "layers.11.self_attn.q_proj.kernel",
                    "layers.0.self_attn.v_proj.bias", "layers.3.self_attn.o_proj.kernel",
                    "layers.2.mlp.down_proj.kernel", "layers.1.post_attention_layernorm.scale",
                    "norm.scale", "lm_head.kernel"]:
    hf_name, _ = flax_to_hf_name(flax_path)
    assert hf_to_flax_name(hf_name)[0] == flax_path
  assert len(WEIGHT_MAP) == 8


def test_multi_shard_checkpoint_parity(hf_checkpoint):
  path, ref = hf_checkpoint(max_shard_size="100KB")
  assert (path / "model.safetensors.index.json").exists()
  assert len(list(path.glob("model-*.safetensors"))) > 2
  model = recllm_jax.load_hf_model(path)
  diff = np.abs(_jax_logits(model) - _torch_logits(ref))[MASK.astype(bool)].max()
  assert diff <= 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_export_then_reload_gives_identical_logits(hf_checkpoint, tmp_path, tie):
  import transformers
  path, _ = hf_checkpoint(tie_word_embeddings=tie)
  model = recllm_jax.load_hf_model(path)
  out = recllm_jax.export_hf(model, tmp_path / "export")
  assert (out / "config.json").exists() and (out / "generation_config.json").exists()
  names = set(load_file(out / "model.safetensors"))
  assert ("lm_head.weight" in names) == (not tie)

  reloaded = recllm_jax.load_hf_model(out)
  np.testing.assert_array_equal(_jax_logits(reloaded), _jax_logits(model))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert hf.config.tie_word_embeddings == tie
  diff = np.abs(_torch_logits(hf) - _jax_logits(model))[MASK.astype(bool)].max()
  assert diff <= 1e-4


def test_export_shards_respect_max_size_and_write_tokenizer(hf_checkpoint, tmp_path):
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  tok.train_from_iterator(["a tiny corpus of words"] * 10,
                          trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<eos>"]))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")

  path, ref = hf_checkpoint()
  out = recllm_jax.export_hf(recllm_jax.load_hf_model(path), tmp_path / "sharded", tokenizer,
                             max_shard_size="60KB")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3
  for f in files:
    tensors = load_file(out / f)
    # A shard exceeds the limit only when a single tensor is larger than it.
    assert sum(t.nbytes for t in tensors.values()) <= 60_000 or len(tensors) == 1
  assert (out / "tokenizer.json").exists()
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_torch_logits(hf), _torch_logits(ref), atol=1e-6)
  assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<eos>"


def test_bf16_export_loads_in_transformers(hf_checkpoint, tmp_path):
  import transformers
  path, _ = hf_checkpoint()
  model = recllm_jax.load_hf_model(path, dtype=jnp.bfloat16)
  out = recllm_jax.export_hf(model, tmp_path / "bf16")
  assert json.loads((out / "config.json").read_text()).get("torch_dtype", "bfloat16") in (
      "bfloat16",)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
  again = recllm_jax.load_hf_model(out, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(_jax_logits(again), _jax_logits(model))


# --- deliberately broken checkpoints -------------------------------------------------------


def _rewrite(path, fn):
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint):
  path, _ = hf_checkpoint()
  _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
    recllm_jax.load_hf_model(path)


def test_unexpected_tensor_is_named(hf_checkpoint):
  path, _ = hf_checkpoint()
  _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"):
    recllm_jax.load_hf_model(path)


def test_extra_layer_is_unexpected(hf_checkpoint):
  path, _ = hf_checkpoint()
  config = json.loads((path / "config.json").read_text())
  config["num_hidden_layers"] = 1
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.1."):
    recllm_jax.load_hf_model(path)


def test_misshaped_tensor_is_named_with_both_shapes(hf_checkpoint):
  path, _ = hf_checkpoint()
  _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                     np.zeros((64, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                            r"\(64, 64\), expected \(32, 64\)"):
    recllm_jax.load_hf_model(path)


def test_uncastable_dtype_is_named(hf_checkpoint):
  path, _ = hf_checkpoint()
  _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones((64,), np.int64)}))
  with pytest.raises(CheckpointError, match=r"'model.norm.weight' has dtype I64, which cannot be cast"):
    recllm_jax.load_hf_model(path)


def test_missing_shard_file_is_named(hf_checkpoint):
  path, _ = hf_checkpoint(max_shard_size="100KB")
  victim = sorted(path.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(CheckpointError, match=victim.name):
    recllm_jax.load_hf_model(path)


def test_pickled_checkpoints_are_refused(hf_checkpoint):
  path, model = hf_checkpoint()
  (path / "model.safetensors").unlink()
  torch.save(model.state_dict(), path / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never loaded"):
    recllm_jax.load_hf_model(path)


def test_unsupported_config_is_refused(hf_checkpoint):
  path, _ = hf_checkpoint()
  config = json.loads((path / "config.json").read_text())
  config["use_sliding_window"] = True
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="use_sliding_window"):
    recllm_jax.load_hf_model(path)
