"""What a run trains: the model and tokenizer, from a preset, an HF directory or a workdir.

A run's weights come from one of three places, chosen by config:

  init_from=<workdir>[@step]   a previous run's Orbax checkpoint (params only: its optimizer
                               and data-iterator state are not restored), e.g. GRPO from SFT;
  init_from=<hf dir>           a Hugging Face directory (config.json + safetensors);
  model.preset='hf'            `model.hf_path` (the SFT default), or any other preset for a
                               random init created directly sharded.

`load_checkpoint(workdir)` is the inference entry point built on the same pieces: model,
tokenizer and config of a trained workdir, without optimizer or data.

Added tokens (`load_tokenizer(new_tokens=...)`, e.g. semantic-ID item tokens): a pretrained
model whose embedding has fewer rows than its tokenizer now has tokens is grown
(`models.grow_vocab`, to `len(tokenizer)` rounded up to a multiple of 64) when its HF weights
are loaded. A workdir's checkpoint is always restored at the vocabulary size it was saved with
(read from the checkpoint itself), so a grown run resumes, exports and seeds GRPO exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from recllm_jax import paths, sharding
from recllm_jax.errors import ConfigError, MissingPathError
from recllm_jax.models import PRESETS, Qwen2ForCausalLM, grow_vocab, vocab_size_for
from recllm_jax.models.config import LORA_TARGETS, Qwen2Config, parse_lora_targets

log = logging.getLogger(__name__)

DEEPSEEK_URL = "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
# Architecture keys a config may override on top of `model.preset` (0 = keep the preset's).
ARCH_OVERRIDES = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads")
CONFIG_FILE = "config.json"  # the resolved run config, written into every workdir
# The run's own tokenizer inside its workdir: a BPE it trained, or a pretrained tokenizer plus
# the tokens the run added. When present it is the run's tokenizer (resume, export, GRPO).
TOKENIZER_DIR = "tokenizer"


# --- where the weights come from --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitSource:
  """A parsed `init_from`: a run's workdir (at `step`, None = latest) or an HF directory."""

  path: epath.Path
  kind: str  # "workdir" | "hf"
  step: int | None = None


def parse_init_from(spec: str) -> InitSource:
  """`dir`, `dir@step` -> InitSource; raises MissingPathError / ConfigError naming the key."""
  path, _, step = spec.partition("@")
  if step and not step.isdigit():
    raise ConfigError(f"init_from={spec!r}: the part after '@' must be a step number")
  root = paths.workdir_path(path)  # a run workdir may be in a bucket
  if (root / "checkpoints").is_dir():
    return InitSource(root, "workdir", int(step) if step else None)
  if step:
    raise ConfigError(f"init_from={spec!r}: '@step' needs a workdir with checkpoints/, "
                      f"and {path!r} has none")
  if (root / "config.json").is_file() and any(root.glob("*.safetensors*")):
    return InitSource(root, "hf")
  raise MissingPathError(f"init_from={spec!r} is neither a run workdir (with checkpoints/) nor "
                         "an HF directory (config.json + *.safetensors); train SFT first, e.g. "
                         "python scripts/train.py --config configs/sft.py:tiny")


def uses_pretrained(model_cfg: ml_collections.ConfigDict) -> bool:
  """`model.preset='hf'`: load the weights (and architecture) from `model.hf_path`."""
  return model_cfg.preset == "hf"


def check_model_choice(config: ml_collections.ConfigDict) -> None:
  """Exactly one weight source: `init_from`, pretrained (`preset='hf'` + `hf_path`) or a random
  init (a preset + overrides)."""
  model_cfg = config.model
  if config.get("init_from"):
    if model_cfg.hf_path:
      raise ConfigError(f"init_from={config.init_from!r} and model.hf_path={model_cfg.hf_path!r} "
                        "are both set; the weights come from init_from, clear model.hf_path")
    return
  if uses_pretrained(model_cfg):
    overridden = [f"model.{k}={model_cfg[k]}" for k in ARCH_OVERRIDES if model_cfg.get(k)]
    if overridden:
      raise ConfigError(f"{', '.join(overridden)} only apply to a random init, but "
                        "model.preset='hf' takes the architecture from model.hf_path; set them "
                        "to 0 or choose a random-init model.preset")
    return
  if model_cfg.preset not in PRESETS:
    raise ConfigError(f"model.preset={model_cfg.preset!r} is unknown; expected 'hf' or one of "
                      f"{sorted(PRESETS)}")
  if model_cfg.hf_path:
    raise ConfigError(f"model.preset={model_cfg.preset!r} (random init) and model.hf_path="
                      f"{model_cfg.hf_path!r} (pretrained weights) are both set; use "
                      "model.preset=hf to fine-tune the weights, or clear model.hf_path")


def check_model_path(config: ml_collections.ConfigDict) -> None:
  """Fails early (before loading data) when the weights to start from are not on disk."""
  if config.get("init_from"):
    parse_init_from(config.init_from)
    return
  model_cfg = config.model
  if not uses_pretrained(model_cfg):
    return
  path = model_cfg.hf_path
  if not path or not Path(path).joinpath("config.json").exists():
    where = (f"model.hf_path={path!r} is not an HF checkpoint directory (no config.json)"
             if path else "model.hf_path is empty")
    raise MissingPathError(
        f"{where}; model.preset='hf' fine-tunes pretrained weights, which must be downloaded "
        f"first ({DEEPSEEK_URL}): huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-"
        "Qwen-1.5B --local-dir DIR, then pass --config.model.hf_path=DIR")


# --- tokenizer -------------------------------------------------------------------------------


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The resolved config a run wrote into its workdir."""
  path = paths.workdir_path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise MissingPathError(f"{path} not found: {workdir} is not a recllm_jax workdir")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _tokenizer_dir(config: ml_collections.ConfigDict,
                   workdir: Path | epath.Path) -> Path | epath.Path | str | None:
  """Where this run's tokenizer lives (None: train one on the catalog into the workdir).

  The workdir's own copy comes first: it holds a BPE the run trained, or a pretrained tokenizer
  plus the tokens the run added (`load_tokenizer(new_tokens=...)`), whose ids the checkpoints
  were trained with. Then `init_from` (that run's tokenizer, by the same rule),
  `model.tokenizer_path`, `model.hf_path`.
  """
  local = workdir / TOKENIZER_DIR
  if (local / "tokenizer.json").exists():
    return local
  if config.get("init_from"):
    source = parse_init_from(config.init_from)
    if source.kind == "hf":
      return source.path
    return _tokenizer_dir(read_run_config(source.path), source.path)
  return config.model.get("tokenizer_path") or config.model.hf_path or None


def _added_token(text: str) -> Any:
  """A token that is split out of any text before the BPE and kept by `skip_special_tokens`."""
  from tokenizers import AddedToken
  return AddedToken(text, special=False, normalized=False)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | Path, catalog: Any = None,
                   extra_texts: Sequence[str] = (), new_tokens: Sequence[str] = ()):
  """The tokenizer of `init_from`, `model.tokenizer_path` or `model.hf_path`, else a byte-level
  BPE trained on the catalog texts plus `extra_texts` (e.g. rendered prompts, so the template
  wording gets merged tokens too) and saved in the workdir (reloaded on resume, so token ids
  never change under a checkpoint).

  `new_tokens` (e.g. semantic-ID item tokens `<a_12>`) become single added tokens (not
  special, not normalized): a trained BPE gets them at training time; a pretrained tokenizer
  that lacks some gets them appended (`add_tokens`) and is then saved into `<workdir>/
  tokenizer`, which every later stage of this run (resume, evaluate, export, GRPO
  `init_from`) reads first, so token ids never change. A model loaded from HF weights is grown
  to match (`build_model`). With no `new_tokens`, nothing is written.
  """
  import transformers  # heavy; only needed here

  workdir = Path(workdir)
  path = _tokenizer_dir(config, workdir)
  if path is not None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    added = tokenizer.get_added_vocab()
    missing = [t for t in dict.fromkeys(new_tokens) if t not in added]
    if missing:
      tokenizer.add_tokens([_added_token(t) for t in missing])
      log.info("added %d tokens to the tokenizer of %s (now %d tokens) -> %s", len(missing), path,
               len(tokenizer), workdir / TOKENIZER_DIR)
      tokenizer.save_pretrained(workdir / TOKENIZER_DIR)
    return tokenizer
  if catalog is None:
    raise MissingPathError(f"{workdir / TOKENIZER_DIR} has no tokenizer.json")
  from recllm_jax.data.tokenizer import train_bpe_tokenizer

  texts = [item.title for item in catalog] + [
      str(v) for item in catalog for v in item.attributes.values() if isinstance(v, str)]
  texts += list(extra_texts)
  log.info("training a %d-token BPE tokenizer (+ %d added tokens) on %d catalog and prompt "
           "texts -> %s", config.model.tokenizer_vocab_size, len(new_tokens), len(texts),
           workdir / TOKENIZER_DIR)
  return train_bpe_tokenizer(texts, workdir / TOKENIZER_DIR,
                             vocab_size=config.model.tokenizer_vocab_size,
                             added_tokens=new_tokens)


# --- model -----------------------------------------------------------------------------------


def model_config(model_cfg: ml_collections.ConfigDict, vocab_size: int,
                 **token_ids: int | None) -> Qwen2Config:
  """The random-init architecture: `model.preset` + overrides, vocab matched to the tokenizer.

  `token_ids` (bos/eos/pad_token_id) are recorded so an exported checkpoint generates and
  stops like the tokenizer expects.
  """
  if model_cfg.preset not in PRESETS:
    raise ConfigError(f"model.preset={model_cfg.preset!r} is unknown; expected one of "
                      f"{sorted(PRESETS)}")
  overrides = {k: model_cfg[k] for k in ARCH_OVERRIDES if model_cfg.get(k)}
  return PRESETS[model_cfg.preset](
      vocab_size=vocab_size, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype,
      remat=model_cfg.remat, dropout=model_cfg.get("dropout", 0.0),
      attention=model_cfg.get("attention", "auto"), **overrides, **token_ids)


def _check_vocab(model: Qwen2ForCausalLM, tokenizer: Any, source: str) -> None:
  """A workdir's model is never grown: its rows are what its run trained with its tokenizer."""
  if model.cfg.vocab_size < len(tokenizer):
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model ({source}) only "
                      f"{model.cfg.vocab_size} embeddings; use the model's own tokenizer")


def _grow_to_tokenizer(model: Qwen2ForCausalLM, tokenizer: Any, seed: int,
                       source: str) -> Qwen2ForCausalLM:
  """Pretrained weights with rows for every token: grown (`models.grow_vocab`) to
  `len(tokenizer)` rounded up to a multiple of 64 when the checkpoint's rows (spare padding
  rows included) are too few, e.g. after adding item tokens to its tokenizer."""
  size = vocab_size_for(model.cfg.vocab_size, len(tokenizer))
  if size == model.cfg.vocab_size:
    return model
  log.info("growing the vocabulary of %s from %d to %d rows for a %d-token tokenizer", source,
           model.cfg.vocab_size, size, len(tokenizer))
  return grow_vocab(model, size, seed=seed)


def _checkpoint_step(workdir: str | Path | epath.Path,
                     step: int | None) -> tuple[epath.Path, int]:
  """(checkpoints directory, step) of a workdir's checkpoint at `step` (None = latest).

  Only committed steps count, so a reader (evaluate.py, export_hf.py) never restores a step that
  a live run is still writing: Orbax writes a local step into `<step>.orbax-checkpoint-tmp-*`
  and renames it when complete, and a `gs://` step in place, with `commit_success.txt` last;
  `is_path_finalized` checks whichever protocol the path uses.
  """
  from recllm_jax.train.checkpoint import finalized_steps

  directory = paths.workdir_path(workdir) / "checkpoints"
  steps = finalized_steps(workdir)
  if not steps:
    raise MissingPathError(f"{directory} holds no finished checkpoint: the run has not saved one "
                           "yet (train.checkpoint_every, and its last step), or this is not the "
                           "workdir of a trained run")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"{workdir}@{step}: no such checkpoint; saved steps are {steps}")
  return directory, step


def saved_vocab_size(workdir: str | Path, step: int | None = None) -> int:
  """Embedding rows of a workdir's checkpoint at `step` (None = latest), from its metadata.

  The one source of truth for a grown vocabulary: it is what Orbax must restore into, whatever
  the tokenizer or the root HF config say.
  """
  import orbax.checkpoint as ocp

  directory, step = _checkpoint_step(workdir, step)
  meta = ocp.PyTreeCheckpointer().metadata(directory / str(step) / "state")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  embed = tree["params"]["embed_tokens"]["embedding"]
  embed = embed.get("value", embed) if isinstance(embed, dict) else embed
  return int(embed.shape[0])


def restore_params(cfg: Qwen2Config, mesh: jax.sharding.Mesh, workdir: Path,
                   step: int | None) -> Qwen2ForCausalLM:
  """A `cfg` model holding a workdir's params at `step` (None = latest), restored straight into
  their sharded layout; the checkpoint's optimizer state, RNG and data iterator stay on disk."""
  import orbax.checkpoint as ocp

  directory, step = _checkpoint_step(workdir, step)
  abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, sharding.logical_shardings(params, mesh))
  restored = ocp.PyTreeCheckpointer().restore(
      directory / str(step) / "state",
      args=ocp.args.PyTreeRestore(
          item={"params": target}, partial_restore=True,
          restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)}))
  log.info("restored the params of %s step %d", workdir, step)
  return nnx.merge(graphdef, restored["params"])


def _model_from_workdir(source: InitSource, run_model_cfg: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh, tokenizer: Any) -> Qwen2ForCausalLM:
  """The architecture of a workdir's run (followed back through its own `init_from`), with
  this run's dtypes and remat, holding the workdir's params.

  A pretrained root's vocabulary may have been grown for added tokens (`build_model`): the
  rows are then those the checkpoint holds (`saved_vocab_size`), not the HF config's.
  """
  saved = read_run_config(source.path)
  numerics = {k: run_model_cfg[k] for k in ("param_dtype", "dtype", "remat")}
  # Run configs saved before `model.attention` existed pick the platform's kernel.
  numerics["attention"] = run_model_cfg.get("attention", "auto")
  if lora_settings(saved):
    return _lora_model_from_workdir(source, saved, numerics, mesh, tokenizer)
  root = saved
  while root.get("init_from"):  # e.g. GRPO resumed from GRPO: the architecture is the root's
    inner = parse_init_from(root.init_from)
    if inner.kind == "hf":
      cfg = _grown_hf_config(inner.path, numerics, source)
      break
    root = read_run_config(inner.path)
  else:
    if uses_pretrained(root.model):
      cfg = _grown_hf_config(root.model.hf_path, numerics, source)
    else:
      cfg = model_config(ml_collections.ConfigDict({**root.model.to_dict(), **numerics}),
                         len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return restore_params(cfg, mesh, source.path, source.step)


def _lora_model_from_workdir(source: InitSource, saved: ml_collections.ConfigDict,
                             numerics: dict[str, Any], mesh: jax.sharding.Mesh,
                             tokenizer: Any) -> Qwen2ForCausalLM:
  """A LoRA run's model at `source.step`, adapters merged into the kernels: its base rebuilt
  from its saved config (`base_pointer`, with this run's numerics), its adapters restored from
  the checkpoint (which holds only them) and merged (`models.lora.merge_lora`)."""
  import orbax.checkpoint as ocp

  from recllm_jax.models.lora import merge_lora

  run = ml_collections.ConfigDict(saved.to_dict())
  run.model.update({k: v for k, v in numerics.items() if k in run.model})
  model = build_model(run, mesh, tokenizer)
  directory, step = _checkpoint_step(source.path, source.step)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        adapters)
  restored = ocp.PyTreeCheckpointer().restore(
      directory / str(step) / "state",
      args=ocp.args.PyTreeRestore(
          item={"params": target}, partial_restore=True,
          restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)}))
  log.info("restored the LoRA adapters of %s step %d onto its base %s", source.path, step,
           base_pointer(saved))
  return merge_lora(nnx.merge(graphdef, restored["params"], base))


def _hf_config(path: str | Path, numerics: dict[str, Any]) -> Qwen2Config:
  return Qwen2Config.from_pretrained(path, **numerics)


def _grown_hf_config(path: str | Path, numerics: dict[str, Any],
                     source: InitSource) -> Qwen2Config:
  """The HF architecture with the vocabulary `source`'s checkpoint was saved with."""
  cfg = _hf_config(path, numerics)
  rows = saved_vocab_size(source.path, source.step)
  return cfg if rows == cfg.vocab_size else cfg.replace(vocab_size=rows)


def _load_hf(path: str | Path, model_cfg: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> Qwen2ForCausalLM:
  from recllm_jax.models.qwen2_hf import load_hf_model
  return load_hf_model(path, dtype=model_cfg.param_dtype, mesh=mesh,
                       compute_dtype=model_cfg.dtype, remat=model_cfg.remat,
                       attention=model_cfg.get("attention", "auto"))


def lora_settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """`model.lora` as {rank, alpha, targets} (targets a tuple), None when LoRA is off (rank 0);
  a bad value is a ConfigError naming its key."""
  lora = config.model.get("lora")
  if lora is None or not lora.rank:
    return None
  rank, alpha = lora.rank, lora.alpha
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"model.lora.rank={rank!r} must be an int >= 0 (0 = no LoRA)")
  if not isinstance(alpha, (int, float)) or alpha <= 0:
    raise ConfigError(f"model.lora.alpha={alpha!r} must be > 0 (the adapters are scaled by "
                      "alpha / rank)")
  targets = parse_lora_targets(lora.targets, key="model.lora.targets")
  if not targets:
    raise ConfigError(f"model.lora.targets={lora.targets!r} names no projection; expected a "
                      f"comma-separated subset of {','.join(LORA_TARGETS)}")
  return {"rank": rank, "alpha": float(alpha), "targets": targets}


def base_pointer(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a LoRA run's frozen base is rebuilt from (saved with its checkpoints): `init_from`,
  or `model.hf_path`, or a random-init `model.preset` with `seed`."""
  if config.get("init_from"):
    return {"init_from": config.init_from}
  if uses_pretrained(config.model):
    return {"hf_path": config.model.hf_path}
  return {"preset": config.model.preset, "seed": config.seed,
          **{k: config.model[k] for k in ARCH_OVERRIDES if config.model.get(k)}}


def checkpoint_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The metadata a run's checkpoints carry ({} without LoRA): the adapters' settings and the
  base they apply to (`base_pointer`)."""
  lora = lora_settings(config)
  if lora is None:
    return {}
  return {"lora": {**lora, "targets": ",".join(lora["targets"])}, "base": base_pointer(config)}


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                tokenizer: Any) -> Qwen2ForCausalLM:
  """The model a run starts from (see the module docstring), sharded over `mesh`, with fresh
  LoRA adapters (`models.lora.add_lora`) on the base when `model.lora.rank > 0`."""
  model = build_base_model(config, mesh, tokenizer)
  lora = lora_settings(config)
  if lora is None:
    return model
  from recllm_jax.models.lora import add_lora, lora_param_count
  model = add_lora(model, lora["rank"], lora["alpha"], lora["targets"], seed=config.seed,
                   mesh=mesh)
  log.info("LoRA rank %d (alpha %g) on %s: %d trainable adapter params over a frozen base",
           lora["rank"], lora["alpha"], ",".join(lora["targets"]),
           lora_param_count(model))
  return model


def build_base_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     tokenizer: Any) -> Qwen2ForCausalLM:
  """The model a run starts from (see the module docstring), sharded over `mesh`.

  HF weights (`model.hf_path`, `init_from=<hf dir>`) are grown to the tokenizer when it has more
  tokens than they have rows (`_grow_to_tokenizer`; deterministic in `config.seed`, so a resumed
  run builds the same shapes before its checkpoint is restored). A workdir's model must already
  have a row for every token (ConfigError otherwise).
  """
  model_cfg = config.model
  if config.get("init_from"):
    source = parse_init_from(config.init_from)
    what = f"init_from={config.init_from!r}"
    if source.kind == "hf":
      return _grow_to_tokenizer(_load_hf(source.path, model_cfg, mesh), tokenizer, config.seed,
                                what)
    model = _model_from_workdir(source, model_cfg, mesh, tokenizer)
    _check_vocab(model, tokenizer, what)
    return model
  if uses_pretrained(model_cfg):
    return _grow_to_tokenizer(_load_hf(model_cfg.hf_path, model_cfg, mesh), tokenizer,
                              config.seed, f"model.hf_path={model_cfg.hf_path!r}")
  cfg = model_config(model_cfg, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return sharding.create_sharded(lambda rngs: Qwen2ForCausalLM(cfg, rngs=rngs), mesh,
                                 seed=config.seed)


def load_checkpoint(workdir: str | Path, step: int | None = None, *,
                    mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[Qwen2ForCausalLM, Any, ml_collections.ConfigDict]:
  """(model, tokenizer, config) of a trained workdir at `step` (None = latest): params only,
  no optimizer state and no data iterator. `mesh` defaults to all devices on `fsdp`."""
  workdir = paths.workdir_path(workdir)
  config = read_run_config(workdir)
  mesh = mesh or sharding.make_mesh()
  tokenizer = load_tokenizer(config, workdir)
  model = _model_from_workdir(InitSource(workdir, "workdir", step), config.model, mesh, tokenizer)
  return model, tokenizer, config


__all__ = ["ARCH_OVERRIDES", "CONFIG_FILE", "DEEPSEEK_URL", "InitSource", "TOKENIZER_DIR",
           "base_pointer", "build_base_model", "build_model", "check_model_choice",
           "checkpoint_metadata", "lora_settings", "check_model_path", "load_checkpoint",
           "load_tokenizer", "model_config", "parse_init_from", "read_run_config",
           "restore_params", "saved_vocab_size", "uses_pretrained"]
