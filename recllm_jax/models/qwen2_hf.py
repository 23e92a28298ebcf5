"""Hugging Face <-> Flax NNX conversion for Qwen2-family checkpoints (safetensors only).

Loading streams one tensor at a time and each device's shard is read straight from the
memory-mapped file (`jax.make_array_from_callback` + safetensors slices), in the Flax layout.
Peak host memory is therefore about one shard plus the (sharded) result, and on several hosts
each process reads only the bytes of its own devices. Pickled `.bin` checkpoints are never read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from recllm_jax import sharding
from recllm_jax.errors import UserError
from recllm_jax.models.config import Qwen2Config, dtype_name
from recllm_jax.models.qwen2 import Qwen2ForCausalLM

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointError(UserError, ValueError):
  """A checkpoint that does not match the model: message names the tensor and file."""


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How an HF tensor maps onto a Flax parameter.

  `linear_in=None`: same values, HF stores them flattened when `flat` (q/k/v biases are
  [H*Dh] in HF and [H, Dh] here). Otherwise the HF tensor is a torch Linear weight [out, in] and
  the Flax kernel is its transpose, whose first `linear_in` dims form `in` and the rest `out`.
  """

  linear_in: int | None = None
  flat: bool = False

  def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.linear_in is None:
      return (math.prod(flax_shape),) if self.flat else tuple(flax_shape)
    n = self.linear_in
    return (math.prod(flax_shape[n:]), math.prod(flax_shape[:n]))

  def read_shard(self, lazy: Any, index: tuple[slice, ...],
                 flax_shape: tuple[int, ...]) -> np.ndarray:
    """Reads only the HF bytes behind one device's `index` into the Flax parameter.

    `lazy` is a safetensors slice handle, so a device's shard is read straight from the file
    (memory-mapped) without materialising the whole tensor on the host.
    """
    index = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, flax_shape))
    if self.linear_in is None:
      if not self.flat:
        return lazy[index]
      rows, local, rest = _contiguous(index, flax_shape)
      return lazy[rows].reshape(local)[rest]
    n = self.linear_in
    in_rows, in_local, in_rest = _contiguous(index[:n], flax_shape[:n])
    out_rows, out_local, out_rest = _contiguous(index[n:], flax_shape[n:])
    part = lazy[out_rows, in_rows]  # HF layout [out, in]
    return part.T.reshape(in_local + out_local)[in_rest + out_rest]

  def to_hf(self, y: np.ndarray) -> np.ndarray:
    if self.linear_in is None:
      return y.reshape(self.hf_shape(y.shape))
    return np.ascontiguousarray(y.reshape(self.hf_shape(y.shape)[::-1]).T)


def _contiguous(index: tuple[slice, ...], dims: tuple[int, ...]):
  """Maps a slice of dims that HF stores flattened to (flat slice, local shape, leftover index).

  Row-major flattening keeps a slice contiguous when only the leading dim is sliced (the usual
  case: heads are sharded, head_dim never is). Otherwise the whole group is read and sliced after.
  """
  inner = math.prod(dims[1:])
  if all((s.start, s.stop) == (0, d) for s, d in zip(index[1:], dims[1:])):
    first = index[0]
    full = (slice(None),) * len(dims)
    return slice(first.start * inner, first.stop * inner), (first.stop - first.start, *dims[1:]), full
  return slice(0, math.prod(dims)), tuple(dims), index


_COPY, _FLAT, _LINEAR, _LINEAR_2IN = _Layout(), _Layout(flat=True), _Layout(1), _Layout(2)

# HF name pattern -> (Flax path template, layout). The whole weight map of the model.
WEIGHT_MAP: tuple[tuple[str, str, _Layout], ...] = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", _COPY),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"layers.\1.self_attn.\2_proj.kernel", _LINEAR),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers.\1.self_attn.\2_proj.bias", _FLAT),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.self_attn.o_proj.kernel", _LINEAR_2IN),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.kernel", _LINEAR),
    (r"model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight", r"layers.\1.\2_layernorm.scale", _COPY),
    (r"model\.norm\.weight", "norm.scale", _COPY),
    (r"lm_head\.weight", "lm_head.kernel", _LINEAR),
)


def hf_to_flax_name(hf_name: str) -> tuple[str, _Layout] | None:
  """`'model.layers.0.mlp.up_proj.weight'` -> (`'layers.0.mlp.up_proj.kernel'`, layout)."""
  for pattern, template, layout in WEIGHT_MAP:
    if re.fullmatch(pattern, hf_name):
      return re.sub(pattern, template, hf_name), layout
  return None


def flax_to_hf_name(flax_path: str) -> tuple[str, _Layout]:
  """Inverse of `hf_to_flax_name`, checked against WEIGHT_MAP so the two never drift."""
  base = re.sub(r"\.(kernel|scale|embedding)$", ".weight", flax_path)
  hf_name = base if base.startswith("lm_head.") else f"model.{base}"
  mapped = hf_to_flax_name(hf_name)
  if mapped is None or mapped[0] != flax_path:
    raise KeyError(f"no HF name for Flax parameter {flax_path!r}")
  return hf_name, mapped[1]


def _checkpoint_files(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file, from the index or the single file."""
  index = path / SAFE_INDEX
  if index.exists():
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    return {name: path / file for name, file in weight_map.items()}
  single = path / SAFE_SINGLE
  if single.exists():
    with safe_open(single, framework="np") as f:
      return {name: single for name in f.keys()}
  pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
  hint = (f" Found {pickled}: pickled checkpoints are never loaded; convert them to safetensors."
          if pickled else "")
  raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}.{hint}")


def _iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Path, Any]]:
  """Yields (name, file, lazy slice handle), opening the file anew for every tensor.

  safetensors memory-maps the file, and pages read through the map count as resident until it
  is closed. Re-opening per tensor (the header parse is cheap) bounds that to one tensor.
  """
  for name, file in sorted(files.items(), key=lambda kv: str(kv[1])):
    if not file.exists():
      raise CheckpointError(f"{file}: shard listed in the index is missing (holds {name!r})")
    with safe_open(file, framework="np") as f:
      if name not in f.keys():
        raise CheckpointError(f"{file}: index lists tensor {name!r} but the file lacks it")
      yield name, file, f.get_slice(name)


_CASTABLE = {"F32", "F16", "BF16", "F64"}


def load_hf_model(path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                  compute_dtype: Any = None, remat: bool = False,
                  attention: str = "xla") -> Qwen2ForCausalLM:
  """Loads an HF Qwen2-family checkpoint directory into a (sharded) `Qwen2ForCausalLM`.

  Args:
    path: directory with `config.json` and `model.safetensors` or sharded safetensors + index.
    dtype: parameter dtype; also the compute dtype unless `compute_dtype` is given.
    mesh: place each parameter on this mesh per `sharding.LOGICAL_RULES`; None = default device.
    compute_dtype: matmul/activation dtype (e.g. bf16 compute over fp32 params).
    remat: rematerialise each decoder layer in the backward pass.
    attention: `Qwen2Config.attention` ('xla' | 'cudnn' | 'splash' | 'auto').
  """
  path = Path(path)
  cfg = Qwen2Config.from_pretrained(path, param_dtype=dtype_name(dtype),
                                    dtype=dtype_name(compute_dtype or dtype), remat=remat,
                                    attention=attention)
  abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  targets = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
  if mesh is not None:
    shardings = {".".join(map(str, k)): s.get_value()
                 for k, s in nnx.to_flat_state(sharding.logical_shardings(state, mesh))}
  else:
    shardings = dict.fromkeys(targets, jax.sharding.SingleDeviceSharding(jax.devices()[0]))

  files = _checkpoint_files(path)
  loaded: dict[str, jax.Array] = {}
  for hf_name, file, lazy in _iter_tensors(files):
    mapped = hf_to_flax_name(hf_name)
    if mapped is None or mapped[0] not in targets:
      if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
        continue  # Some tied checkpoints still store the (identical) head; it is redundant.
      raise CheckpointError(f"{file}: unexpected tensor {hf_name!r} (not part of a "
                            f"{'tied' if cfg.tie_word_embeddings else 'untied'} Qwen2 model)")
    flax_name, layout = mapped
    target = targets[flax_name].get_value()
    src_dtype = lazy.get_dtype()
    if src_dtype not in _CASTABLE:
      raise CheckpointError(f"{file}: tensor {hf_name!r} has dtype {src_dtype}, which cannot be "
                            f"cast to {jnp.dtype(target.dtype).name}")
    expected = layout.hf_shape(target.shape)
    if tuple(lazy.get_shape()) != expected:
      raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {tuple(lazy.get_shape())}, "
                            f"expected {expected} for config.json")
    np_dtype = ml_dtypes.bfloat16 if target.dtype == jnp.bfloat16 else np.dtype(target.dtype)
    loaded[flax_name] = jax.make_array_from_callback(
        target.shape, shardings[flax_name],
        lambda idx, lazy=lazy, layout=layout, shape=target.shape: np.ascontiguousarray(
            layout.read_shard(lazy, idx, shape), dtype=np_dtype))

  missing = sorted(set(targets) - set(loaded))
  if missing:
    hf_missing = [flax_to_hf_name(m)[0] for m in missing]
    raise CheckpointError(f"{path}: missing tensors {hf_missing[:8]}"
                          f"{' …' if len(hf_missing) > 8 else ''} ({len(hf_missing)} in all)")
  for key, var in nnx.to_flat_state(state):
    var.set_value(loaded[".".join(map(str, key))])
  return nnx.merge(graphdef, state)


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected an int or e.g. '2GB', '500MB'")
  return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def export_hf(model: Qwen2ForCausalLM, out_dir: str | os.PathLike, tokenizer: Any = None, *,
              max_shard_size: int | str = "2GB", dtype: Any = None) -> Path:
  """Writes an HF checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Writes `config.json`, `generation_config.json`, safetensors shards of at most
  `max_shard_size` with `model.safetensors.index.json` (a single `model.safetensors` when it
  fits), and the tokenizer files when `tokenizer` is given. Parameters are gathered to host one
  at a time; `dtype` defaults to the model's parameter dtype. A LoRA model is exported with its
  adapters merged (`models.lora.merge_lora`), so the HF model computes what it computes.
  """
  import transformers  # Heavy import, only needed for export.

  from recllm_jax.models.lora import merge_lora

  model = merge_lora(model)  # LoRA adapters folded into the kernels: W + alpha/rank * A @ B
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  cfg = model.cfg
  dtype = jnp.dtype(dtype or cfg.jnp_param_dtype)
  np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)
  limit = _parse_size(max_shard_size)

  hf_cfg = transformers.Qwen2Config(**{**cfg.to_hf_dict(), "torch_dtype": dtype.name})
  hf_cfg.save_pretrained(out)
  transformers.GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                pad_token_id=cfg.pad_token_id).save_pretrained(out)

  for stale in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
    stale.unlink(missing_ok=True)
  params = [(".".join(map(str, k)), v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  # Plan shards from shapes first, then gather one shard's tensors at a time to host.
  shards: list[list[tuple[str, jax.Array]]] = [[]]
  shard_bytes, total = 0, 0
  for flax_path, value in params:
    nbytes = math.prod(value.shape) * dtype.itemsize
    if shard_bytes and shard_bytes + nbytes > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((flax_path, value))
    shard_bytes += nbytes
    total += nbytes
  names = ([SAFE_SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for name, shard_params in zip(names, shards):
    tensors = {}
    for flax_path, value in shard_params:
      hf_name, layout = flax_to_hf_name(flax_path)
      tensors[hf_name] = layout.to_hf(sharding.host_array(value).astype(np_dtype))
      weight_map[hf_name] = name
    save_file(tensors, str(out / name), metadata={"format": "pt"})
  if len(shards) > 1:
    with open(out / SAFE_INDEX, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
    if tokenizer.unk_token is None:
      _write_null_unk_token(out)
  return out


def _write_null_unk_token(out: Path) -> None:
  """Says `unk_token: null` in tokenizer_config.json, as the published R1 checkpoint does.

  transformers 5 loads a qwen2 checkpoint's tokenizer as `Qwen2Tokenizer`, which otherwise adds
  `<|endoftext|>` as an unknown token: one id more than the model was trained with.
  """
  path = out / "tokenizer_config.json"
  config = json.loads(path.read_text(encoding="utf-8"))
  config["unk_token"] = None
  path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
