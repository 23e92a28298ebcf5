"""The memory planner: its exact rows against real allocations, its formulas by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs`, as the scripts do

from configs.grpo import get_config as grpo_config  # noqa: E402
from configs.sft import get_config as sft_config  # noqa: E402
from recllm_jax import plan, sharding  # noqa: E402
from recllm_jax.errors import ConfigError  # noqa: E402
from recllm_jax.models import Qwen2ForCausalLM  # noqa: E402
from recllm_jax.models.config import Qwen2Config  # noqa: E402
from recllm_jax.train import build, optim  # noqa: E402


def _per_device_bytes(tree) -> list[int]:
  """Bytes each device holds of the arrays in `tree` (every shard, replicas included)."""
  held = {d: 0 for d in jax.devices()}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      held[s.device] += s.data.nbytes
  return list(held.values())


def test_params_and_optimizer_match_the_allocated_train_state():
  config = sft_config("tiny")  # mesh.fsdp=-1: all 8 devices (tests/conftest.py)
  p = plan.plan(config, num_devices=8)
  assert p.mesh == (1, 8, 1)
  # The train state as `train.loop.train` builds it: the random-init model created sharded,
  # then `optim.init_train_state` (vocab: the planner's, the BPE size a tiny run trains).
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  cfg = build.model_config(config.model, config.model.tokenizer_vocab_size)
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  _, state = optim.init_train_state(model, plan.make_optimizer(config), seed=0)
  assert p.model == cfg
  held = _per_device_bytes(state)
  assert len(set(held)) == 1  # no uneven shards
  assert p.params == _per_device_bytes(state.params)[0]
  assert p.params + p.opt_state == held[0]
  # FSDP really splits: a replicated state would hold 3x the full params per device.
  full = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert held[0] < 3 * full


def test_master_copy_is_counted_when_configured():
  config = sft_config("tiny")
  if "master_dtype" not in config.train:
    pytest.skip("train.master_dtype is not in this tree")
  with config.unlocked():
    config.model.param_dtype = "bfloat16"
  plain = plan.plan(config, num_devices=1, mesh_shape=(1, 1, 1))
  with config.unlocked():
    config.train.master_dtype = "float32"
  master = plan.plan(config, num_devices=1, mesh_shape=(1, 1, 1))
  # bf16 params: moments become fp32 (2 x 2 bytes more per param) plus the fp32 copy (4 bytes).
  assert master.opt_state - plain.opt_state == 2 * plain.params + 2 * plain.params


def _toy(**overrides) -> Qwen2Config:
  return Qwen2Config(**{**dict(vocab_size=16, hidden_size=8, intermediate_size=12,
                               num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, tie_word_embeddings=False,
                               param_dtype="float32", dtype="bfloat16"), **overrides})


def test_state_bytes_by_hand():
  cfg = _toy()
  # embed 16*8 + layer [norms 2*8, q 8*2*4 + 2*4, k and v 2*(8*1*4 + 4), o 2*4*8,
  # mlp 3*8*12] + final norm 8 + lm_head 8*16 = 128 + 512 + 8 + 128 = 776 params, fp32.
  n = 16 * 8 + (2 * 8 + 8 * 2 * 4 + 2 * 4 + 2 * (8 * 4 + 4) + 2 * 4 * 8 + 3 * 8 * 12) + 8 + 8 * 16
  assert n == 776
  opt = plan.make_optimizer(sft_config("tiny"))
  params, rest = plan.state_bytes(cfg, opt, plan.abstract_mesh(1, 1, 1))
  assert params == 4 * n
  # AdamW mu and nu (fp32) + 2 int32 counters (adam, schedule) + step int32 + 2 uint32 rng.
  assert rest == 2 * 4 * n + 2 * 4 + 4 + 8
  # fsdp=2 splits the 8-wide `embed` axis of every matrix; biases and norm scales replicate.
  params2, _ = plan.state_bytes(cfg, opt, plan.abstract_mesh(1, 2, 1))
  replicated = 2 * 8 + 2 * 4 + 2 * 4 + 8  # norms, q bias, k/v biases, final norm
  assert params2 == 4 * (replicated + (n - replicated) // 2)


def test_kv_cache_and_activation_formulas_by_hand():
  cfg = _toy()  # bf16 compute: 2 bytes
  # k and v: 1 layer x [rows=4, K=1, S=10, Dh=4] bf16 each, a [4, 10] bool mask, int32 index.
  assert plan.kv_cache_bytes(cfg, 4, 10, plan.abstract_mesh(1, 1, 1)) == 2 * 4 * 10 * 4 * 2 + 40 + 4
  # Rows split over fsdp=2, the mask too; the index is replicated.
  assert plan.kv_cache_bytes(cfg, 4, 10, plan.abstract_mesh(1, 2, 1)) == (
      (2 * 4 * 10 * 4 * 2 + 40) // 2 + 4)
  # c*D + 2(4+c)D + c(H+2K)Dh + (4+c)H*T + c*H*Dh + c*D + 3cF, D=8 F=12 H=2 K=1 Dh=4, T=5.
  per = 16 + 96 + 32 + 60 + 16 + 16 + 72
  assert plan.layer_activation_bytes(cfg, 5) == per
  final = 6 * 8
  assert plan.activation_bytes(cfg, 3, 5, remat=False) == 3 * (per + final)
  assert plan.activation_bytes(cfg, 3, 5, remat=True) == 3 * (2 * 8 + per + final)
  # Chunk 2 of 5 positions: 2 fp32 [rows=3, 2, V=16] arrays + head (bf16 copy, fp32 grad).
  assert plan.lm_head_bytes(cfg, 3, 5, 2, with_entropy=False) == 2 * 3 * 2 * 16 * 4 + 8 * 16 * 6


def test_grpo_plan_of_the_default_config_uses_the_1_5b_architecture():
  config = grpo_config()  # model.preset='hf', no weights downloaded
  p = plan.plan(config, num_devices=8)  # fsdp=-1 -> 8
  assert p.mesh == (1, 8, 1) and p.task == "grpo"
  assert (p.model.num_hidden_layers, p.model.vocab_size) == (28, 151936)
  assert p.rows == 64 and p.micro_rows == 8 and p.seq_len == 1024 + 512 - 1
  assert p.reference == p.params  # beta = 0.04 > 0
  # 1,777,088,000 fp32 params over 8 devices (a few small vectors are replicated).
  assert 1_777_088_000 * 4 / 8 <= p.params < 1.001 * 1_777_088_000 * 4 / 8
  assert p.peak == max(p.rollout_peak, p.update_peak)
  with config.unlocked():
    config.grpo.beta = 0.0
  assert plan.plan(config, num_devices=8).reference == 0


def test_sft_plan_has_no_rollout_rows_and_rejects_bad_splits():
  config = sft_config()
  p = plan.plan(config, num_devices=1)
  assert (p.kv_cache, p.reference, p.rollout_peak) == (0, 0, 0)
  with pytest.raises(ConfigError, match="grad_accum_steps=3"):
    plan.plan(config, num_devices=1, grad_accum_steps=3)  # 32 rows


def test_suggest_finds_the_fewest_micro_batches_that_fit():
  config = sft_config()
  tiny = plan.Device("tiny", 42 * plan.GiB)  # 1.5B fp32 state + grads: 33 GiB
  s = plan.suggest(config, tiny, num_devices=1)
  assert s is not None and s.fits(tiny)
  if s.grad_accum_steps > 1:  # one fewer micro-batch (the previous divisor) must not fit
    fewer = max(d for d in range(1, s.grad_accum_steps) if 32 % d == 0)
    assert not plan.plan(config, 1, grad_accum_steps=fewer, remat=s.remat).fits(tiny)
  assert plan.suggest(config, plan.Device("none", plan.GiB), max_devices=1) is None


def test_attention_rows_follow_model_attention():
  """The einsum materialises (4 + c)*H*S score bytes per token; a fused kernel keeps its fp32
  log-sum-exp 4*H (cuDNN also its c*S mask bias), and only where it serves the call."""
  # bf16, H=2, head dim 8 (cuDNN needs a multiple of 8)
  xla, cudnn, splash = (_toy(attention=a, hidden_size=16) for a in ("xla", "cudnn", "splash"))
  assert plan.attention_bytes(xla, 5, 5, causal=True) == (4 + 2) * 2 * 5
  assert plan.attention_bytes(cudnn, 5, 5, causal=True) == 4 * 2 + 2 * 5
  assert plan.attention_bytes(splash, 5, 5, causal=True) == 4 * 2
  # A prefill (a cache call): cuDNN still fuses, splash falls back to the einsum.
  assert plan.attention_bytes(cudnn, 5, 9, causal=False) == 4 * 2 + 2 * 9
  assert plan.attention_bytes(splash, 5, 9, causal=False) == (4 + 2) * 2 * 9
  # fp32 compute: cuDNN falls back, so the scores are counted again.
  assert plan.attention_bytes(cudnn.replace(dtype="float32"), 5, 5, causal=True) == (
      (4 + 4) * 2 * 5)
  assert plan.attention_bytes(_toy(attention="cudnn"), 5, 5, causal=True) == (4 + 2) * 2 * 5
  saved = (4 + 2) * 2 * 5 - (4 * 2 + 2 * 5)
  assert plan.layer_activation_bytes(xla, 5) - plan.layer_activation_bytes(cudnn, 5) == saved


def test_plan_resolves_auto_attention_for_the_planned_device():
  config = sft_config()  # model.attention='auto'
  gpu = plan.plan(config, num_devices=1, device=plan.DEVICES["h200"])
  tpu = plan.plan(config, num_devices=1, device=plan.DEVICES["tpu-v5p"])
  xla = plan.plan(config, num_devices=1, model_cfg=gpu.model.replace(attention="xla"))
  assert (gpu.model.attention, tpu.model.attention) == ("cudnn", "splash")
  assert gpu.activations_no_remat < xla.activations_no_remat
  assert "attention cudnn" in plan.format_plan(gpu, plan.DEVICES["h200"])
