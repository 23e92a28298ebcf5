import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from recllm_jax.models import ConfigError, Qwen2Config, Qwen2ForCausalLM, count_params
from recllm_jax.models.config import deepseek_r1_distill_qwen_1_5b, tiny

# DeepSeek-R1-Distill-Qwen-1.5B's config.json as transformers 4.x writes it.
R1_DISTILL_4X = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def _as_5x(hf):
  hf = dict(hf)
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
  hf["dtype"] = hf.pop("torch_dtype")
  return hf


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_reads_both_transformers_layouts(layout):
  hf = R1_DISTILL_4X if layout == "4.x" else _as_5x(R1_DISTILL_4X)
  cfg = Qwen2Config.from_hf_dict(hf)
  assert cfg.rope_theta == 10000.0
  assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
  assert cfg.head_dim == 128 and not cfg.tie_word_embeddings
  ref = deepseek_r1_distill_qwen_1_5b()
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings"):
    assert getattr(cfg, field) == getattr(ref, field), field


def test_rope_theta_from_5x_rope_parameters_wins():
  hf = _as_5x({**R1_DISTILL_4X, "rope_theta": 1e6})
  assert Qwen2Config.from_hf_dict(hf).rope_theta == 1e6


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama"}, "llama"),
    ({"num_key_value_heads": 5}, "num_key_value_heads=5"),
])
def test_unsupported_settings_raise(change, message):
  with pytest.raises(ConfigError, match=message):
    Qwen2Config.from_hf_dict({**R1_DISTILL_4X, **change})


def test_invalid_json_names_file_and_line(tmp_path):
  (tmp_path / "config.json").write_text('{\n  "vocab_size": 10,\n  oops\n}')
  with pytest.raises(ConfigError, match=r"config.json:3"):
    Qwen2Config.from_pretrained(tmp_path)


def test_hf_dict_round_trip():
  cfg = Qwen2Config.from_hf_dict(R1_DISTILL_4X)
  again = Qwen2Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
  assert again == cfg


def test_r1_distill_preset_has_exactly_1_777_088_000_params_without_allocating():
  abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(deepseek_r1_distill_qwen_1_5b(),
                                                     rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert count_params(abstract) == 1_777_088_000


def test_derived_head_dim_follows_overridden_sizes():
  assert tiny().head_dim == 32  # 128 / 4
  # The loop's override path: a smaller width must not keep the preset's 32-wide heads.
  assert tiny(hidden_size=32, num_attention_heads=4).head_dim == 8
  assert tiny(num_attention_heads=8, num_key_value_heads=2).head_dim == 16
  assert tiny().replace(hidden_size=256).head_dim == 64
  assert deepseek_r1_distill_qwen_1_5b(hidden_size=768).head_dim == 64
  assert tiny().replace(hidden_size=32, num_attention_heads=4) == tiny(hidden_size=32)


def test_explicit_head_dim_is_kept():
  # Qwen2-family configs may set head_dim independently of hidden_size / heads.
  cfg = Qwen2Config.from_hf_dict({**R1_DISTILL_4X, "head_dim": 64})
  assert cfg.head_dim == 64
  assert cfg.replace(hidden_size=768).head_dim == 64
  assert cfg.replace(head_dim=None).head_dim == 128  # asking to derive it again


def test_underivable_head_dim_is_a_config_error():
  with pytest.raises(ConfigError, match="hidden_size=100 is not a multiple of "
                                        "num_attention_heads=8; set head_dim"):
    tiny(hidden_size=100, num_attention_heads=8, num_key_value_heads=2)
  assert tiny(hidden_size=100, num_attention_heads=8, num_key_value_heads=2,
              head_dim=16).head_dim == 16


REFERENCE_DIR = (Path(__file__).resolve().parents[3] / "shared" / "reference"
                 / "deepseek-r1-distill-qwen-1.5b")


@pytest.mark.parametrize("sliding_window", ["as published (4096)", None])
def test_the_real_r1_distill_config_maps_to_the_1_5b_preset_exactly(tmp_path, sliding_window):
  if not (REFERENCE_DIR / "config.json").exists():
    pytest.skip(f"reference config not found at {REFERENCE_DIR}")
  hf = json.loads((REFERENCE_DIR / "config.json").read_text())
  assert hf["sliding_window"] == 4096 and hf["use_sliding_window"] is False
  if sliding_window is None:  # the other form found in the wild
    hf["sliding_window"] = None
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg = Qwen2Config.from_pretrained(tmp_path)
  # Every field, not a chosen few. One known difference: the published config.json says
  # bos_token_id 151643 (its EOS), while the tokenizer and generation_config.json use 151646
  # (<｜begin▁of▁sentence｜>); the preset takes the one generation really starts with.
  generation = json.loads((REFERENCE_DIR / "generation_config.json").read_text())
  preset = deepseek_r1_distill_qwen_1_5b()
  assert (cfg.bos_token_id, preset.bos_token_id) == (151643, generation["bos_token_id"])
  assert cfg.replace(bos_token_id=preset.bos_token_id) == preset
