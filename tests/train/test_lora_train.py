"""LoRA runs end to end: adapter-only checkpoints with a base pointer, exact resume, learning."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recllm_jax.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import test_loop  # noqa: E402  (the small SFT setup of the loop tests)
from test_loop import data_dir  # noqa: E402,F401  (fixture)

# The loop tests' small setup, as a LoRA run with synchronous checkpoints every 3 of 6 steps.
LORA = {"train.lr": 1e-2, "train.warmup_steps": 0, "train.num_steps": 6,
        "train.checkpoint_every": 3, "train.async_checkpoint": False,
        "model.lora.rank": 4, "model.lora.alpha": 8.0}


def make_config(workdir: Path, data: Path, **overrides):
  return test_loop.make_config(workdir, data, **{**LORA, **overrides})


def losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow  # three short runs: ~50 s on a 2-core CPU
def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(tmp_path, data_dir):
  from recllm_jax.train import build
  from recllm_jax.train.loop import train

  train(make_config(tmp_path, data_dir))
  first = losses(tmp_path)
  assert sorted(first) == list(range(1, 7))

  # Only the adapters (and their Adam moments) are on disk, with a pointer to the base.
  meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "checkpoints" / "3" / "state")
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  names = {str(getattr(k, "key", k)) for path, _ in
           jax.tree_util.tree_flatten_with_path(tree["params"])[0] for k in path[-2:]}
  assert names & {"lora_a", "lora_b"} and not names & {"kernel", "embedding", "scale", "bias"}
  step_meta = ocp.CheckpointManager(tmp_path / "checkpoints").metadata(3).custom_metadata
  assert step_meta["base"] == {"preset": "tiny", "seed": 0, "hidden_size": 32,
                               "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 2}
  assert step_meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": "q,k,v,o,gate,up,down"}

  # Resume from step 3: the base is rebuilt from the config, the adapters restored onto it.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  train(make_config(tmp_path, data_dir))
  again = losses(tmp_path)
  assert sorted(again) == list(range(1, 7))
  for step in range(4, 7):
    assert again[step] == pytest.approx(first[step], abs=1e-6), step

  # Inference / export load the base and merge the adapters: only LoRA targets change.
  model, _, _ = build.load_checkpoint(tmp_path)
  assert model.cfg.lora_rank == 0
  config = make_config(tmp_path, data_dir)
  base = build.build_base_model(config, jax.sharding.Mesh(np.array(jax.devices()[:1]),
                                                          ("fsdp",)), build.load_tokenizer(
                                                              config, tmp_path))
  layer, base_layer = model.layers[0], base.layers[0]
  np.testing.assert_array_equal(model.embed_tokens.embedding[...],
                                base.embed_tokens.embedding[...])
  assert not np.allclose(layer.self_attn.q_proj.kernel[...],
                         base_layer.self_attn.q_proj.kernel[...])

  # Adapters saved for other settings (or another base) are refused, naming the keys (by the
  # drift check on the saved config.json; the step's own metadata is checked on restore too).
  with pytest.raises(ConfigError, match=r"changes what its checkpoints mean: model.lora.alpha "
                     r"8.0 -> 4.0"):
    train(make_config(tmp_path, data_dir, **{"model.lora.alpha": 4.0, "train.num_steps": 7}))


@pytest.mark.slow
def test_lora_sft_learns(tmp_path, data_dir):
  from recllm_jax.train.loop import train

  # The base is a frozen random init, so only the adapters (rank 8) can fit the data.
  train(make_config(tmp_path, data_dir, **{"train.num_steps": 40, "train.checkpoint_every": 0,
                                           "train.batch_size": 16, "train.lr": 3e-2,
                                           "model.lora.rank": 8, "model.lora.alpha": 16.0}))
  got = losses(tmp_path)
  early, late = np.mean([got[s] for s in range(1, 4)]), np.mean([got[s] for s in range(36, 41)])
  assert late < early - 0.3, (early, late)  # measured: 5.69 -> 5.31


def test_lora_keys_are_validated_naming_the_key(tmp_path, data_dir):
  from recllm_jax.train import checks

  for overrides, message in [
      ({"model.lora.targets": "q,x"}, r"model.lora.targets='q,x'"),
      ({"model.lora.targets": ""}, r"model.lora.targets='' names no projection"),
      ({"model.lora.alpha": 0.0}, r"model.lora.alpha=0.0 must be > 0"),
      ({"model.lora.rank": -2}, r"model.lora.rank=-2"),
      ({"train.master_dtype": "float32", "model.param_dtype": "bfloat16"},
       r"train.master_dtype='float32' with model.lora.rank=4")]:
    with pytest.raises(ConfigError, match=message):
      checks.check_config(checks.expand_paths(make_config(tmp_path, data_dir, **overrides)))
