"""Meshes, logical rules, and an 8-device FSDP x tensor model equal to one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import recllm_jax
from recllm_jax import sharding
from recllm_jax.errors import ConfigError
from recllm_jax.models import Qwen2ForCausalLM
from recllm_jax.models.config import tiny

def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("axes, message", [
    (dict(data=3, fsdp=-1), "mesh.data=3 mesh.fsdp=-1 mesh.tensor=1: 8 devices cannot be split"),
    (dict(data=2, fsdp=2, tensor=1), "2 x 2 x 1 = 4 devices, but 8 are available"),
    (dict(data=-1, fsdp=-1), "at most one may be -1"),
    (dict(data=0, fsdp=-1), "positive size")])
def test_make_mesh_rejects_bad_shapes_naming_the_keys(axes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    sharding.make_mesh(**axes)


def test_batch_axis_size_is_data_times_fsdp():
  assert sharding.batch_axis_size(sharding.make_mesh(data=2, fsdp=2, tensor=2)) == 4
  assert sharding.batch_axis_size(sharding.make_mesh(data=1, fsdp=1, tensor=8)) == 1


def test_logical_rules_replicate_non_divisible_dims():
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 4, 16), mesh) == P(
      "fsdp", "tensor", None)
  # 2 KV heads cannot be split 4 ways: replicate that dim rather than fail.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(
      "fsdp", None, None)
  assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P("fsdp", None)
  with pytest.raises(KeyError, match="'nonsense'"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_logical_rules_context_swaps_the_rule_set():
  mesh = sharding.make_mesh(data=8, fsdp=1)
  data_parallel = (("batch", ("data", "fsdp")), ("embed", None), ("mlp", None))
  with sharding.logical_rules(data_parallel):
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P(None, None)
    assert sharding.logical_to_spec(("batch", "embed"), (8, 64), mesh) == P("data", None)
  assert sharding.logical_to_spec(("batch",), (8,), mesh) == P("data")
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")


def test_logical_rules_are_part_of_the_jit_cache_key():
  # `shard` reads the rules at trace time: a trace made under one rule set must not be reused
  # under another (a plain global would silently keep the first layout).
  mesh = sharding.make_mesh(fsdp=8)
  constrain = jax.jit(lambda x: sharding.shard(x * 2, ("embed",)))
  x = jnp.arange(16.0)
  with jax.set_mesh(mesh):
    assert constrain(x).sharding.spec == P("fsdp")
    with sharding.logical_rules((("embed", None),)):
      assert sharding.active_rules() == (("embed", None),)
      assert constrain(x).sharding.is_fully_replicated
    assert constrain(x).sharding.spec == P("fsdp")
  assert sharding.active_rules() == sharding.LOGICAL_RULES


def test_eight_device_mesh_matches_single_device(hf_checkpoint):
  path, _ = hf_checkpoint(num_attention_heads=8, num_key_value_heads=4)
  ids = np.random.RandomState(0).randint(3, 128, (4, 10))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  single = recllm_jax.load_hf_model(path)(jnp.asarray(ids), jnp.asarray(mask))

  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  model = recllm_jax.load_hf_model(path, mesh=mesh)
  q = model.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (32, 2, 8)  # [64, 8, 8] / (fsdp 2, tensor 4)
  assert model.layers[0].mlp.down_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")
  assert model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")
  assert model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")

  graphdef, state = nnx.split(model)
  batch_sharding = jax.NamedSharding(mesh, P(("data", "fsdp")))

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  with jax.set_mesh(mesh):
    sharded = forward(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
  np.testing.assert_allclose(np.asarray(sharded)[mask.astype(bool)],
                             np.asarray(single)[mask.astype(bool)], atol=1e-5)


def test_create_sharded_never_builds_an_unsharded_copy():
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  cfg = tiny(vocab_size=256)
  model = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  up = model.layers[0].mlp.up_proj.kernel.get_value()
  assert up.sharding.spec == P("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (64, 88)
  # Same values as an unsharded (jitted) init with the same seed.
  ref = sharding.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh=None)
  np.testing.assert_array_equal(np.asarray(up), np.asarray(ref.layers[0].mlp.up_proj.kernel[...]))
  # The seed passed as a traced key (no compile-time constant to fold) draws the same weights.
  seeded = sharding.create_sharded(lambda rngs: Qwen2ForCausalLM(cfg, rngs=rngs), mesh, seed=0)
  for a, b in zip(jax.tree.leaves(nnx.state(seeded)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_and_create_inside_a_mesh_context(hf_checkpoint):
  path, _ = hf_checkpoint()
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  with jax.set_mesh(mesh):
    loaded = recllm_jax.load_hf_model(path, mesh=mesh)
    created = sharding.create_sharded(lambda: Qwen2ForCausalLM(tiny(), rngs=nnx.Rngs(0)), mesh)
  assert loaded.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")
  assert created.layers[0].mlp.up_proj.kernel.get_value().sharding.spec == P("fsdp", "tensor")
