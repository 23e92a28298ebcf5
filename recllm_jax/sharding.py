"""Device meshes, logical-axis rules, and sharded model creation.

Every weight and main activation carries logical axis names (`'embed'`, `'mlp'`, `'batch'`…).
`LOGICAL_RULES` maps them onto the mesh axes `data`, `fsdp` and `tensor`:

* `data` + `fsdp` split the batch; `fsdp` also splits the `embed` dimension of every weight
  (ZeRO-3 style: gathered just in time by XLA).
* `tensor` splits heads, the MLP hidden dimension and the vocabulary (Megatron style).

A dimension that is not divisible by its mesh axes is replicated instead of failing, so one rule
set serves every model size and mesh (e.g. 2 KV heads on a tensor axis of 4).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

LOGICAL_RULES: LogicalRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)

_active_rules: list[LogicalRules] = [LOGICAL_RULES]


@contextlib.contextmanager
def logical_rules(rules: LogicalRules) -> Iterator[None]:
  """Temporarily replaces the logical-to-mesh rules (e.g. pure data parallelism)."""
  _active_rules.append(tuple(rules))
  try:
    yield
  finally:
    _active_rules.pop()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} "
                       f"tensor={tensor}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {len(devices)} are available")
  # jax.make_mesh orders devices so that the innermost (tensor) axis gets the fastest links.
  # Auto axes: XLA propagates shardings from the weights and the `shard` constraints.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh: Any, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Any = None, rules: LogicalRules | None = None) -> P:
  """Maps logical axis names to a PartitionSpec, replicating non-divisible dimensions."""
  rules = dict(_active_rules[-1] if rules is None else rules)
  spec, used = [], set()
  for i, name in enumerate(logical_axes):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
      if mesh is not None:
        axes_tuple = tuple(a for a in axes_tuple if a in mesh.shape and mesh.shape[a] > 1)
      # A mesh axis may shard one dimension only; later dimensions fall back to replication.
      axes_tuple = tuple(a for a in axes_tuple if a not in used)
      if shape is not None and mesh is not None and shape[i] % _axis_size(mesh, axes_tuple):
        axes_tuple = ()
      used.update(axes_tuple)
      axes = axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None)
    spec.append(axes)
  return P(*spec)


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding inside jit when a mesh is set (`jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """A pytree like `state` whose leaves are the NamedShardings of its variables."""

  def to_sharding(var: nnx.Variable) -> nnx.Variable:
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape)
    return var.replace(value=NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh)))

  return jax.tree.map(to_sharding, state, is_leaf=_is_variable)


def abstract_module(constructor: Callable[[], nnx.Module]) -> nnx.Module:
  """`nnx.eval_shape(constructor)`, also inside a `jax.set_mesh` context.

  Under a mesh, flax would turn each variable's logical names straight into mesh axes; ours are
  resolved by `LOGICAL_RULES` instead, so the shapes are evaluated with no mesh in scope.
  """
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.eval_shape(constructor)


def create_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh | None = None) -> nnx.Module:
  """Builds a module with every variable created directly in its sharded layout.

  The constructor is traced abstractly first (`nnx.eval_shape`), then run under `jit` with
  `out_shardings`, so no device ever holds an unsharded copy of the weights.
  """
  abstract = abstract_module(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  out_shardings = None if mesh is None else state_shardings(abstract_state, mesh)

  @jax.jit
  def init():
    state = nnx.state(constructor())
    if out_shardings is not None:
      state = jax.lax.with_sharding_constraint(state, out_shardings)
    return state

  return nnx.merge(graphdef, init())


def host_array(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly sharded) array to host memory as numpy."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
