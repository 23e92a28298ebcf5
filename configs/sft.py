"""SFT configs: `--config configs/sft.py[:preset]`, then `--config.key=value` overrides.

Presets (one line each, as `scripts/train.py --help` lists them):
  paper   (the default) RecLLM-R1's SFT: full fine-tuning of DeepSeek-R1-Distill-Qwen-1.5B
  tiny    a random-init 4-layer Qwen2 on synthetic data in <workdir>/data: minutes on a 2-core CPU
  office  the model alone on Amazon-2018 data: a tiny Qwen2 writing items as semantic IDs

`paper` needs a local download, fp32 master weights, bf16 compute and remat:
--config.model.hf_path=/path/to/DeepSeek-R1-Distill-Qwen-1.5B
--config.data.dir=/path/to/amazon18/Office_Products. `office` (--config.data.dir=...) trains on
each user's whole sequence; it is what scripts/reproduce.sh trains.

The config is locked: a mistyped key fails instead of being silently ignored. Path keys
(workdir, data.dir, model.hf_path, model.tokenizer_path) may use `~` and `$VAR`. For every
`*_every` key, 0 means never (the final checkpoint on exit is still written).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from recllm_jax.data.prompts import PromptConfig
from recllm_jax.errors import ConfigError
from recllm_jax.train.logprobs import DEFAULT_CHUNK_SIZE


def prompt_config() -> ml_collections.ConfigDict:
  """Every `PromptConfig` field, so any of them can be overridden as `data.prompt.<field>`."""
  cfg = ml_collections.ConfigDict()
  for field in dataclasses.fields(PromptConfig):
    default = field.default
    # None defaults become typed placeholders so a string can still be assigned later.
    cfg[field.name] = config_dict.placeholder(str) if default is None else default
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by every preset (documented in docs/training.md)."""
  c = ml_collections.ConfigDict()
  c.task = "sft"
  c.workdir = "/tmp/recllm_sft"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # 'hf': load hf_path (weights and architecture); or a models.PRESETS name for a random init,
  # which must leave hf_path empty.
  c.model.preset = "hf"
  c.model.hf_path = ""
  c.model.tokenizer_path = ""  # default: hf_path's tokenizer, else one trained on the catalog
  c.model.tokenizer_vocab_size = 2048  # only for a trained tokenizer
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"  # compute dtype
  c.model.remat = False
  # Residual dropout in SFT (random-init presets; Qwen2Config.dropout): for small data.
  c.model.dropout = 0.0
  # Attention kernel (Qwen2Config.attention): xla (einsum) | cudnn | splash | auto (cudnn on GPU,
  # splash on TPU, xla on CPU).
  c.model.attention = "auto"
  # LoRA (recllm_jax/models/lora.py): rank 0 = full fine-tuning; rank r > 0 freezes the base and
  # trains rank-r adapters (alpha / rank scaling) on the comma-separated projections `targets`
  # (a subset of q,k,v,o,gate,up,down). Checkpoints then hold only the adapters; exports merge them.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "q,k,v,o,gate,up,down"
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads"):
    c.model[key] = 0  # 0 = the preset's value (random init only)

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""
  c.data.format = "auto"  # auto | jsonl | amazon18 | synthetic
  # synthetic: the generator's seed. Not `seed`: runs over several seeds share one dataset (and a
  # shared data folder is never regenerated under another run).
  c.data.synthetic_seed = 0
  c.data.on_bad_data = "error"  # error | skip
  # amazon18: the fraction of users whose last valid.csv row is held out as the valid split.
  c.data.valid_fraction = 0.1
  # amazon18: "last_row" trains on those users' earlier rows; "users" holds them out entirely
  # (like test: histories never trained on; the split to choose settings on, docs/results.md).
  c.data.valid_holdout = "last_row"
  c.data.max_length = 1024
  c.data.num_buckets = 4
  c.data.prefetch_threads = 2
  c.data.prompt = prompt_config()
  # How items are written in prompts and answers (recllm_jax.data.items): "title" (the paper's
  # format) or "sid" (semantic IDs: <data.dir>/sids.tsv from scripts/build_sids.py, else the
  # data's own, e.g. Amazon's info.txt; each code is one added token).
  c.data.item_format = "title"
  # item_format "sid": the SID file to read (scripts/build_sids.py --out) instead of
  # <data.dir>/sids.tsv or the data's own, so SIDs built for a run need not be written into the
  # data folder; "" = those.
  c.data.sid_file = ""
  # Also train on every history item after the first (its tokens in the prompt), so one example
  # teaches each next item of its history, not only its target.
  c.data.history_loss = False
  # Keep only each user's longest training sequences (drop an example whose history + target
  # is a prefix of another of the same user's); with history_loss the same next-item targets
  # are trained at a fraction of the tokens ("whole user sequences").
  c.data.user_sequences = False
  # MiniOneRec's alignment tasks mixed into SFT, comma-separated: "title2item" (the title ->
  # the item text, e.g. its SID) and/or "item2title"; one example per catalog item and task.
  c.data.align_tasks = ""
  # Drop each history item of a training example with this probability, anew every epoch
  # (data.schema.drop_history_items): an augmentation for small data; 0 = off.
  c.data.history_dropout = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 32  # global, in sequences
  # Micro-batches per step. batch_size must be a multiple of mesh.data x mesh.fsdp x this.
  c.train.grad_accum_steps = 1
  c.train.lr = 1e-5
  c.train.min_lr_ratio = 0.1
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.max_grad_norm = 1.0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8  # Adam's epsilon (optax's default)
  # Step intervals; 0 = never (checkpoint_every=0 still saves once on exit).
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 16
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.peak_flops = 0.0  # per device; 0 = datasheet table / measured CPU matmul
  # Sequence positions per LM-head chunk in the loss (train/logprobs.py: no [B, T, V] logits);
  # 0 = all at once.
  c.train.logits_chunk_size = DEFAULT_CHUNK_SIZE
  # "float32": keep an fp32 master copy of bf16 params in the optimizer state (Adam runs on
  # it, the params are its bf16 rounding); "" = update the params in model.param_dtype.
  c.train.master_dtype = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 = all remaining devices
  c.mesh.tensor = 1

  # Multi-host (recllm_jax.distributed, docs/multihost.md): set all three to start the processes
  # yourself (e.g. on localhost), or none to let JAX detect a TPU pod / SLURM / MPI cluster
  # (a single plain host then runs without the distributed runtime).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = 0  # 0 = unset
  c.distributed.process_id = -1  # -1 = unset

  c.profile = ml_collections.ConfigDict()
  # "N:M": a jax.profiler trace of loop steps N..M (1-based, both included) into
  # <workdir>/profile; "" = none.
  c.profile.steps = ""
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.workdir = "/tmp/recllm_sft_tiny"
  c.model.preset = "tiny"
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPU
  c.data.format = "synthetic"
  c.data.max_length = 256
  c.data.prompt.max_history_tokens = 160
  c.data.prompt.target_format = "cot"  # what configs/grpo.py:tiny continues from
  c.train.num_steps = 300
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.train.checkpoint_every = 100
  return c


def paper(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.workdir = "/tmp/recllm_sft_r1_distill_1.5b"
  c.model.preset = "hf"
  c.model.remat = True
  c.data.format = "amazon18"
  c.data.max_length = 1024
  # CoT targets (templated rationale, then <answer>): the format the GRPO stage continues.
  c.data.prompt.target_format = "cot"
  c.train.num_steps = 2000
  c.train.batch_size = 32
  c.train.lr = 1e-5
  c.train.warmup_steps = 100
  return c


def office_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data and prompt settings of the `office` presets, shared by configs/grpo.py:office so
  that GRPO renders exactly the prompts its SFT checkpoint was trained on."""
  c.data.format = "amazon18"
  c.data.item_format = "sid"
  c.data.max_length = 256
  c.data.prompt.target_format = "direct"  # evaluation ranks by constrained beam over bare SIDs
  c.data.prompt.history_attributes = ()  # a SID already says what the item is like
  c.data.prompt.max_history_tokens = 200
  # The instruction first and the history last, one bare SID a line, so the answer is written
  # where every trained history item is (after the previous item's line): over 3 seeds on whole
  # held-out users, NDCG@10 +6% and steps a third faster than numbered lines followed by the
  # instruction (docs/results.md).
  c.data.prompt.user_template = "{profile}{instruction} {answer_format}\n{history}"
  c.data.prompt.history_item_template = "{item}{details}\n"
  return c


def office(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model alone on Amazon-2018 data on a 2-core CPU: a random-init tiny Qwen2 that writes
  items as semantic IDs, trained on each user's whole sequence (the loss on every history item,
  not only the target). Settings from the sweep in docs/results.md (valid.csv-derived rows)."""
  c = office_data(tiny(c))
  c.workdir = "/tmp/recllm_sft_office"
  c.data.history_loss = True
  c.data.user_sequences = True
  c.model.tokenizer_vocab_size = 1024  # the prompt wording; the SID codes are added tokens
  # Without dropout the model overfits after ~8 epochs; dropout 0.1 and a 600-step cosine
  # schedule won the sweep on the valid rows, and lr 1.5e-3 beat 3e-3 over 3 seeds on whole
  # held-out users (docs/results.md).
  c.model.dropout = 0.1
  c.train.num_steps = 600
  c.train.batch_size = 32
  c.train.lr = 1.5e-3
  c.train.warmup_steps = 50
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  return c


PRESETS = {"": paper, "paper": paper, "tiny": tiny, "office": office}


def from_preset(presets: dict, base, arg: str | None, where: str) -> ml_collections.ConfigDict:
  """`presets[arg](base())`, locked; an unknown preset is a ConfigError naming `where`."""
  name = arg or ""
  if name not in presets:
    raise ConfigError(f"unknown preset {name!r} for {where}; expected one of "
                      f"{sorted(k for k in presets if k)}")
  config = presets[name](base())
  config.lock()
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return from_preset(PRESETS, base_config, arg, "configs/sft.py")
