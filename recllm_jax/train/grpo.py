"""GRPO, stage two of RecLLM-R1: group rollouts, composite rewards, clipped KL-penalised updates.

One GRPO step (`GrpoTask.step`), all on the current params:

    prompts  = next(data)                          # P prompts (Grain, host numpy)
    rollout  = G completions per prompt            # jitted decoder; each prompt prefilled once
    rewards  = parse -> ground -> score            # host, `recllm_jax.rec`
    A        = ADVANTAGES[grpo.advantage](rewards) # group-normalised
    old, ref = chunked log-probs                   # jitted forward, never a [rows, T, V] array
    repeat grpo.num_iterations (mu) times: state = update(state, rollout batch)

Which log-probs are "old", and how sampling masks enter the ratio:
  The ratio is exp(logp - old_logp) where both are log-softmax(logits / temperature) over the
  FULL vocabulary, computed by the same chunked forward as the loss (`token_logprobs`). `old` is
  that forward at the rollout params (the params before the first of the mu updates), so the
  first update after a rollout has ratio exactly 1 in every rollout mode (with mu = 1 it is
  `stop_gradient(logp)`, which also saves the forward). Sampling-time truncations (top-k, top-p,
  the catalog trie in `cot_constrained` / `beam`) are NOT applied to either side: they restrict
  which tokens can be drawn, and a drawn token always has non-zero probability under the full
  softmax, so the ratio stays finite; this is also what TRL does. The decoder's own
  `GenerateOutput.logprobs` (under the truncated distribution) are only logged.
The reference model (for the k3 KL term) is a copy of the initial policy (`init_from`), held
only when `grpo.beta > 0`; its size is logged at start-up. With `grpo.ref_sync_every` = N > 0 it
follows the policy (TRL's `sync_ref_model`): after every N-th step, ref = alpha * policy +
(1 - alpha) * ref with alpha = `grpo.ref_sync_alpha`; it is then saved with every checkpoint
(`extra_state`), so a resume continues with the synced reference, not the `init_from` one.
With LoRA (`model.lora.rank > 0`) the reference is the frozen base itself: the same params with
the adapters switched off (`make_logprob_fn(adapters=False)`), so no copy is held (as TRL does
with PEFT); `ref_sync_every` is then refused.

Optional recipe pieces (MiniOneRec / DAPO): `grpo.add_gt` puts the target item into each beam
group that lacks it (`add_ground_truth`); `grpo.dynamic_sampling` drops groups whose rewards
are all equal and refills the batch with further prompts' groups, up to
`grpo.dynamic_sampling_max_rounds` extra rollouts, always training on exactly
`train.batch_size` groups (`advantages.select_groups`).

Multi-host: each process reads its rows of the prompt batch, then `global_prompts` gathers the
whole batch onto every process. The rollout runs on all devices (its outputs, sharded over every
process, are all-gathered with `sharding.host_array`), so every process scores all completions
and computes the same advantages and metrics as a single process would; the update rows become
global arrays with `pipeline.host_to_global`. Only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recllm_jax import buckets
from recllm_jax import distributed, paths
from recllm_jax.rollout import (ItemRollout, RolloutBatch, collate_prompts, normalize_mode,
                                render_prompt)
from recllm_jax.data import pipeline
from recllm_jax.errors import ConfigError, UserErrors
from recllm_jax.train import advantages as adv_lib
from recllm_jax.train import metrics as metrics_lib
from recllm_jax.train import logprobs as logprobs_lib
from recllm_jax.train import policy_loss
from recllm_jax.train.task import TRAIN_EXAMPLES_FILE, Work

log = logging.getLogger(__name__)

ROLLOUTS = ("cot", "cot_constrained", "beam")


def check_recipe_keys(gc: ml_collections.ConfigDict) -> None:
  """ConfigError, naming the key, for a bad value of the optional recipe keys."""
  if int(gc.ref_sync_every) < 0:
    raise ConfigError(f"grpo.ref_sync_every={gc.ref_sync_every} must be >= 0 (0 = never)")
  if not 0.0 < float(gc.ref_sync_alpha) <= 1.0:
    raise ConfigError(f"grpo.ref_sync_alpha={gc.ref_sync_alpha} must be in (0, 1] "
                      "(1 = copy the policy into the reference)")
  if int(gc.dynamic_sampling_max_rounds) < 0:
    raise ConfigError(f"grpo.dynamic_sampling_max_rounds={gc.dynamic_sampling_max_rounds} "
                      "must be >= 0 (extra rollout rounds per step)")
  if float(gc.sft_coef) < 0:
    raise ConfigError(f"grpo.sft_coef={gc.sft_coef} must be >= 0 (0 = no SFT term)")
  if gc.add_gt and gc.rollout != "beam":
    raise ConfigError(f"grpo.add_gt=True needs grpo.rollout='beam' (it replaces the lowest-"
                      f"ranked beam with the target item), got grpo.rollout={gc.rollout!r}")


def mix_params(policy: Any, reference: Any, alpha: float) -> Any:
  """alpha * policy + (1 - alpha) * reference, leaf by leaf in the reference's dtype (TRL's
  `SyncRefModelCallback`); alpha = 1 is an exact copy. Returns new arrays (the policy's
  buffers are donated to the next update)."""
  if alpha == 1.0:
    return jax.tree.map(lambda p, r: jnp.copy(p).astype(r.dtype), policy, reference)
  return jax.tree.map(lambda p, r: (alpha * p.astype(jnp.float32) + (1.0 - alpha)
                                    * r.astype(jnp.float32)).astype(r.dtype), policy, reference)


def ref_sync_due(step: int, every: int) -> bool:
  """Whether the reference syncs after loop step `step` (1-based): every `every` steps."""
  return every > 0 and step > 0 and step % every == 0


# --- rollouts -> training rows -----------------------------------------------------------------


# G completions per prompt (host numpy); what `training_rows` and the rewards read.
Rollout = RolloutBatch


def training_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, rollout: Rollout,
                  group_size: int, length_multiple: int = 32) -> pipeline.Batch:
  """Prompts [P, Tp] (left-padded) + completions [N, M] -> next-token rows for the update.

  `input_ids`, `attention_mask`, `targets` are [N, T] as in the SFT pipeline, so one model
  forward serves both tasks: row n is prompt n // G followed by its completion, and position
  Tp - 1 + j predicts completion token j. `completion_mask` [N, M'] covers only the last M'
  positions (the completions, cut to the longest one rounded up to `length_multiple`, so a run
  compiles few shapes): only those positions are projected to the vocabulary and trained
  (EOS included).
  """
  n, m = rollout.tokens.shape
  keep = min(m, buckets.round_up(max(int(rollout.lengths.max()), 1), length_multiple))
  completion = rollout.tokens[:, :keep]  # [N, M']
  completion_mask = np.arange(keep)[None, :] < rollout.lengths[:, None]  # [N, M']
  ids = np.concatenate([np.repeat(prompt_ids, group_size, axis=0), completion], axis=1)
  mask = np.concatenate([np.repeat(prompt_mask, group_size, axis=0).astype(bool),
                         completion_mask], axis=1)  # [N, Tp + M']
  return {"input_ids": ids[:, :-1].astype(np.int32), "attention_mask": mask[:, :-1].astype(np.int32),
          "targets": ids[:, 1:].astype(np.int32),
          "completion_mask": completion_mask.astype(np.float32)}


def _fieldwise(batches: Sequence[RolloutBatch], on_tuple, on_array) -> RolloutBatch:
  """A RolloutBatch whose every field combines that field of `batches`: `on_tuple` for the
  per-row tuples (texts, parses, items), `on_array` for the arrays; None stays None."""
  out = {}
  for f in dataclasses.fields(RolloutBatch):
    values = [getattr(b, f.name) for b in batches]
    out[f.name] = (None if values[0] is None
                   else on_tuple(values) if isinstance(values[0], tuple) else on_array(values))
  return RolloutBatch(**out)


def concat_rollouts(rollouts: Sequence[RolloutBatch]) -> RolloutBatch:
  """Rollouts of the same G and max_new_tokens, one after the other (row-wise)."""
  return _fieldwise(rollouts, lambda vs: tuple(v for value in vs for v in value), np.concatenate)


def take_rows(rollout: RolloutBatch, rows: Sequence[int]) -> RolloutBatch:
  """The given rows of a rollout, in that order."""
  rows = list(rows)
  return _fieldwise([rollout], lambda vs: tuple(vs[0][r] for r in rows) if vs[0] else vs[0],
                    lambda vs: vs[0][np.asarray(rows, np.int64)])


def add_ground_truth(rollout: RolloutBatch, targets: Sequence[Sequence[str]],
                     engine: ItemRollout, prompts: Sequence[str], group_size: int
                     ) -> tuple[RolloutBatch, int]:
  """MiniOneRec's `add_gt` for beam rollouts: in each group none of whose beams answers a
  target, the lowest-ranked beam (its last row, rank G-1) becomes the first target item (its
  trie token sequence + EOS), keeping that rank. `targets[p]` are prompt p's target ids;
  `prompts[p]` its text. Returns the new rollout and the number of groups changed. A target
  outside the catalog, or too long for the completion width, is skipped.
  """
  tokens, lengths = rollout.tokens.copy(), rollout.lengths.copy()
  truncated = rollout.truncated.copy()
  texts, parsed, items = list(rollout.texts), list(rollout.parsed), list(rollout.items)
  changed = 0
  for p, wanted in enumerate(targets):
    span = range(p * group_size, (p + 1) * group_size)
    if any(i in set(wanted) for r in span for i in items[r]):
      continue
    known = [t for t in wanted if t in engine.index_of]
    if not known:
      continue
    leaf = int(engine.trie.item_leaf[engine.index_of[known[0]]])
    seq = list(engine.trie.leaf_sequences[leaf]) + [engine.eos]
    if len(seq) > tokens.shape[1]:
      continue
    row = span[-1]
    tokens[row] = engine.pad
    tokens[row, :len(seq)] = seq
    lengths[row], truncated[row] = len(seq), False
    (text,), (parse,) = engine.read(tokens[row:row + 1], lengths[row:row + 1], [prompts[p]])
    texts[row], parsed[row] = text, parse
    items[row] = tuple(engine.trie.catalog_ids(leaf))
    changed += 1
  return dataclasses.replace(rollout, tokens=tokens, lengths=lengths, truncated=truncated,
                             texts=tuple(texts), parsed=tuple(parsed), items=tuple(items)), changed


@dataclasses.dataclass
class _Round:
  """One rollout round of a step: its prompts, rollout, scores and host timings."""

  indices: list[int]
  rollout: RolloutBatch
  samples: list[Any]
  total: np.ndarray
  components: dict[str, np.ndarray]
  rollout_tokens: int
  time_rollout: float
  time_reward: float
  gt_added: int = 0


# --- the loss ----------------------------------------------------------------------------------


def grpo_loss_fn(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                 gc: ml_collections.ConfigDict, logits_chunk_size: int
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`optim.LossFn` of a GRPO update over rollout rows (`training_rows` + advantages).

  Log-probs cover the completion positions only ([N, M'], the width of `completion_mask`).
  `old_logp` is absent when mu = 1 (then it is `stop_gradient(logp)`); `ref_logp` when beta = 0.
  """
  del rng
  mask = batch["completion_mask"]  # [N, M']
  logp, entropy = logprobs_lib.model_token_logprobs(
      model, batch["input_ids"], batch["attention_mask"], batch["targets"],
      chunk_size=logits_chunk_size, temperature=gc.temperature, with_entropy=True,
      last=mask.shape[1])  # [N, M'] x2
  return policy_loss.policy_loss_terms(
      logp, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"],
      mask, loss_type=gc.loss_type, epsilon_low=float(gc.epsilon_low),
      epsilon_high=float(gc.epsilon_high), beta=float(gc.beta),
      max_completion_length=gc.max_new_tokens, entropy=entropy,
      entropy_coef=float(gc.entropy_coef), sft_rows=batch.get("sft_rows"),
      sft_coef=float(gc.sft_coef), kl_estimator=gc.get("kl_estimator", "k3"))


def make_logprob_fn(graphdef: Any, *, temperature: float, logits_chunk_size: int,
                    adapters: bool = True):
  """Jitted `params, rows -> logp [N, M']` of the completion positions, under the loss's own
  arithmetic (the old and reference log-probs). `adapters=False`: with a LoRA model's adapters
  switched off, i.e. the frozen base (a LoRA run's reference model, no copy of the weights)."""
  from flax import nnx

  from recllm_jax.models.lora import set_lora_enabled

  @jax.jit
  def logprob_fn(params, rows):
    model = nnx.merge(graphdef, params)
    if not adapters:
      set_lora_enabled(model, False)
    return logprobs_lib.model_token_logprobs(
        model, rows["input_ids"], rows["attention_mask"], rows["targets"],
        chunk_size=logits_chunk_size, temperature=temperature,
        last=rows["completion_mask"].shape[1])

  return logprob_fn


# --- the task ----------------------------------------------------------------------------------


SAMPLES_FILE = "samples.txt"


class GrpoTask:
  """Prompts, rollouts, rewards and the GRPO update; the train loop does the rest.

  Attributes:
    tokenizer: the policy's tokenizer (from `init_from`).
    dataset: the loaded `RecDataset` (train prompts; held-out `valid` prompts for `val_reward`).
    updates_per_step: mu optimizer updates per loop step (the LR schedule counts updates).
  """

  name = "grpo"

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> None:
    """The `grpo.*` keys, checked before anything loads; every bad one is reported."""
    from recllm_jax.train import build

    gc = config.grpo
    found = UserErrors()
    if gc.rollout not in ROLLOUTS:
      found.add(ConfigError(f"grpo.rollout={gc.rollout!r}; expected one of {ROLLOUTS}"))
    found.attempt(check_recipe_keys, gc)
    found.attempt(adv_lib.get_advantage_fn, gc.advantage)
    found.attempt(policy_loss.get_loss_aggregation, gc.loss_type)
    found.attempt(policy_loss.get_kl_estimator, gc.get("kl_estimator", "k3"))
    lora = found.attempt(build.lora_settings, config)
    if lora and gc.beta > 0 and int(gc.ref_sync_every):
      found.add(ConfigError(
          f"grpo.ref_sync_every={gc.ref_sync_every} with model.lora.rank={lora['rank']}: a LoRA "
          "run's reference is its frozen base (adapters off), which cannot follow the policy; "
          "set grpo.ref_sync_every=0 or model.lora.rank=0"))
    if config.rewards.get("sid_prefix", 0.0) and config.data.item_format != "sid":
      found.add(ConfigError(
          f"rewards.sid_prefix={config.rewards.sid_prefix} needs semantic-ID items; "
          f"data.item_format is {config.data.item_format!r} (set it to 'sid', or the weight to 0)"))
    found.raise_found()

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
    from recllm_jax.data.loading import load_run_data
    from recllm_jax.data.prompts import PromptConfig
    from recllm_jax.rec import Grounder, RewardContext, BusinessRule
    from recllm_jax.train import build

    self.config = config
    self.workdir = paths.workdir_path(workdir)
    gc = self.gc = config.grpo
    self.check_config(config)
    self.mode = normalize_mode(gc.rollout)
    self.updates_per_step = int(gc.num_iterations)
    self.dataset, self.codec = load_run_data(config, self.workdir)
    self.tokenizer = build.load_tokenizer(config, self.workdir, self.dataset.catalog,
                                          new_tokens=self.codec.new_tokens())
    self.prompt_cfg = PromptConfig(**config.data.prompt.to_dict())
    rule = None
    b = config.business
    if b.attribute or b.item_file:
      rule = (BusinessRule.from_file(b.item_file, boost=b.boost, catalog=self.dataset.catalog,
                                     attribute=b.attribute, value=b.value) if b.item_file else
              BusinessRule(attribute=b.attribute, value=b.value, boost=b.boost))
    self.reward_ctx = RewardContext.from_dataset(self.dataset, k=config.reward_k,
                                                 business_rule=rule, codec=self.codec)
    self.grounder = Grounder(self.codec, popularity=self.reward_ctx.popularity,
                             fuzzy_cutoff=gc.fuzzy_cutoff or None)
    self.reward_weights = dict(config.rewards.to_dict())
    self.reward_paths = dict(config.reward_fns.to_dict())
    self._prompt_cache: dict[tuple[str, int], tuple[str, list[int]]] = {}
    if jax.process_index() == 0:
      self._write_prompts(self.workdir / TRAIN_EXAMPLES_FILE)

  # -- prompts --------------------------------------------------------------------------------

  def prompt(self, split: str, index: int) -> tuple[str, list[int]]:
    """(prompt text, its token ids) of example `index` of `split` (beam mode adds the answer
    prefix, so that beams start at the first title)."""
    key = (split, index)
    if key not in self._prompt_cache:
      self._prompt_cache[key] = render_prompt(self.dataset.split(split)[index], self.codec,
                                              self.tokenizer, self.prompt_cfg, self.mode)
    return self._prompt_cache[key]

  def _write_prompts(self, path: Path, count: int = 8) -> None:
    from recllm_jax.data.pipeline import format_prompts
    path.write_text(format_prompts([self.prompt("train", i)[1]
                                    for i in range(min(count, len(self.dataset.train)))],
                                   self.tokenizer))

  def train_iterator(self) -> grain.DatasetIterator:
    """Shuffled, repeated batches of `train.batch_size` prompts (a Grain map dataset)."""
    pad = pipeline.pad_id(self.tokenizer)
    ds = (pipeline.source(list(range(len(self.dataset.train))))
          .shuffle(seed=self.config.seed).repeat(None)
          .map(lambda i: (i, self.prompt("train", i)[1])))
    # Each process reads its rows of each global batch; `step` gathers the whole batch.
    ds = pipeline.process_batches(ds, self.config.train.batch_size,
                                  lambda rows: collate_prompts(rows, pad))
    # Kept: dynamic sampling draws its extra prompts from it (checkpointed by the loop).
    self._train_iter = pipeline.make_iterator(ds, self.config.data.prefetch_threads)
    return self._train_iter

  def global_prompts(self, batch: pipeline.Batch) -> pipeline.Batch:
    """This process's prompt rows -> the whole global batch, on every process.

    Prompts are tiny next to the rollouts, and with the global batch on every host the host
    side of a step (rewards, advantages, metrics) is the single-process computation, so
    group and batch statistics are global by construction. A no-op with one process.
    """
    if jax.process_count() == 1:
      return batch
    pad = {"input_ids": pipeline.pad_id(self.tokenizer)}
    return distributed.gather_rows(pipeline.common_length(batch, left=True, pad_values=pad))

  # -- set-up by the loop ---------------------------------------------------------------------

  def setup(self, run: Any) -> None:
    """Builds the jitted update, the log-prob forward and (beta > 0) the frozen reference."""
    from recllm_jax.train import optim

    gc, tc = self.gc, self.config.train
    self.run = run
    # The rollout path `recllm_jax.inference.recommend` serves users with.
    self.rollout_engine = ItemRollout(self.codec, self.tokenizer, self.prompt_cfg, self.mode,
                                      vocab_size=run.vocab_size, grounder=self.grounder,
                                      answer_items=gc.answer_items)
    chunk = tc.logits_chunk_size
    loss_fn = functools.partial(grpo_loss_fn, gc=gc, logits_chunk_size=chunk)
    self.update = optim.make_train_step(run.graphdef, run.optimizer, loss_fn, run.schedule,
                                        tc.grad_accum_steps, run.state_sharding,
                                        wrt=run.trainable)
    self.logprob_fn = make_logprob_fn(run.graphdef, temperature=gc.temperature,
                                      logits_chunk_size=chunk)
    self.ref_params = None
    self.ref_sync_every = int(gc.ref_sync_every)
    # LoRA: the reference is the frozen base, i.e. the policy with its adapters off (as TRL
    # does with PEFT): the same params, no second copy.
    self.ref_logprob_fn = None
    if gc.beta > 0 and run.model_cfg.lora_rank:  # ref_sync_every = 0: check_config
      self.ref_logprob_fn = make_logprob_fn(run.graphdef, temperature=gc.temperature,
                                            logits_chunk_size=chunk, adapters=False)
      log.info("reference model (beta=%g): the LoRA base with adapters off (no copy held)",
               gc.beta)
    elif gc.beta > 0:
      # A copy, not an alias: the train state's buffers are donated to every update.
      self.ref_params = jax.tree.map(jnp.copy, run.initial_params)
      nbytes = sum(x.nbytes for x in jax.tree.leaves(self.ref_params))
      how = (f"synced every {self.ref_sync_every} steps, alpha {float(gc.ref_sync_alpha):g}"
             if self.ref_sync_every else "frozen copy of init_from")
      log.info("reference model (beta=%g): %.1f MB held (%s)", gc.beta, nbytes / 2**20, how)
    elif self.ref_sync_every:
      log.warning("grpo.ref_sync_every=%d ignored: grpo.beta=0 holds no reference model",
                  self.ref_sync_every)
      self.ref_sync_every = 0
    alpha = float(gc.ref_sync_alpha)
    self._mix = jax.jit(functools.partial(mix_params, alpha=alpha))

  # -- checkpointed state of the task ---------------------------------------------------------

  def extra_state(self) -> Any:
    """The synced reference (saved with every checkpoint), or None when it never changes."""
    return {"reference": self.ref_params} if self.ref_sync_every else None

  def restore_extra_state(self, restored: Any) -> None:
    """Takes the reference saved with the restored checkpoint (None: kept from init_from)."""
    if restored is None:
      log.warning("the checkpoint holds no synced reference model (saved without "
                  "grpo.ref_sync_every?): the reference restarts from init_from")
      return
    self.ref_params = restored["reference"]
    log.info("restored the synced reference model from the checkpoint")

  # -- one step -------------------------------------------------------------------------------

  def rollout(self, params: Any, batch: pipeline.Batch, rng: jax.Array, *,
              split: str = "train", greedy: bool = False,
              num_generations: int | None = None) -> RolloutBatch:
    """G completions per prompt in `batch` under `params`, decoded and parsed (host numpy)."""
    from flax import nnx

    gc = self.gc
    model = nnx.merge(self.run.graphdef, params)
    prompts = [self.prompt(split, int(i))[0] for i in batch["example_index"]]
    with jax.set_mesh(self.run.mesh):
      return self.rollout_engine.run(
          model, batch["input_ids"], batch["attention_mask"],
          num_samples=num_generations or gc.num_generations, max_new_tokens=gc.max_new_tokens,
          rng=rng, greedy=greedy, temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p,
          prompts=prompts)

  def score(self, split: str, indices: Sequence[int], rollout: RolloutBatch, group_size: int):
    """Host: grounded answers -> composite reward. Every sample carries its group rank
    explicitly (`Sample.group_rank`): the beam order, or descending log-prob for sampled rows.
    Returns (samples, total [N], components {name: [N]}, reason counts)."""
    from recllm_jax.rec import build_samples, composite_rewards
    from recllm_jax.rec.rewards import ranks_from_scores

    examples = [self.dataset.split(split)[i] for i in indices]
    ranks = rollout.ranks
    if ranks is None and rollout.scores is not None:
      ranks = ranks_from_scores(rollout.scores, group_size)
    # Neither: build_samples ranks each group's rows by position.
    samples = build_samples(examples, list(rollout.texts), list(rollout.parsed), self.grounder,
                            group_size=group_size,
                            group_ranks=None if ranks is None else [int(r) for r in ranks])
    total, components, reasons = composite_rewards(samples, self.reward_weights,
                                                   self.reward_ctx, self.reward_paths)
    return samples, total, components, reasons

  def _round(self, params: Any, batch: pipeline.Batch, rng: jax.Array) -> _Round:
    """One rollout of `batch`'s prompts, (with `grpo.add_gt`) the targets added, scored."""
    g = self.gc.num_generations
    t0 = time.perf_counter()
    rollout = self.rollout(params, batch, rng)
    t1 = time.perf_counter()
    indices = [int(i) for i in batch["example_index"]]
    added = 0
    if self.gc.add_gt:
      rollout, added = add_ground_truth(
          rollout, [self.dataset.train[i].targets for i in indices], self.rollout_engine,
          [self.prompt("train", i)[0] for i in indices], g)
    samples, total, components, _ = self.score("train", indices, rollout, g)
    tokens = int(batch["attention_mask"].sum()) + int(rollout.lengths.sum())
    return _Round(indices=indices, rollout=rollout, samples=samples, total=total,
                  components=components, rollout_tokens=tokens, time_rollout=t1 - t0,
                  time_reward=time.perf_counter() - t1, gt_added=added)

  def step(self, state: Any, batch: pipeline.Batch) -> tuple[Any, dict[str, Any], Work]:
    """Rollout -> rewards -> advantages -> mu updates (see the module docstring)."""
    import collections

    gc, g, run = self.gc, self.gc.num_generations, self.run
    t0 = time.perf_counter()
    batch = self.global_prompts(batch)
    num_prompts = len(batch["example_index"])
    rng, rollout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    rounds = [self._round(state.params, batch, rollout_rng)]
    extra: dict[str, Any] = {}
    if gc.dynamic_sampling:
      # DAPO: more prompts' groups until the batch holds num_prompts groups with signal.
      signal = list(np.asarray(adv_lib.group_has_signal(rounds[0].total, g)))
      while sum(signal) < num_prompts and len(rounds) <= int(gc.dynamic_sampling_max_rounds):
        if getattr(self, "_train_iter", None) is None:
          raise RuntimeError("grpo.dynamic_sampling draws prompts from train_iterator(): "
                             "create it before the first step")
        rng, round_rng = jax.random.split(rng)
        more = self.global_prompts(next(self._train_iter))
        rounds.append(self._round(state.params, more, round_rng))
        signal += list(np.asarray(adv_lib.group_has_signal(rounds[-1].total, g)))
      keep = adv_lib.select_groups(signal, num_prompts)
      extra = {"dynamic/rounds": len(rounds) - 1, "dynamic/groups_seen": len(signal),
               "dynamic/groups_with_signal": int(sum(signal)),
               "dynamic/groups_kept": int(sum(signal[i] for i in keep))}
    else:
      keep = list(range(num_prompts))
    state = state.replace(rng=jax.random.key_data(rng))  # checkpointed: resumes replay rollouts

    first = rounds[0]
    if len(rounds) == 1 and keep == list(range(num_prompts)):
      indices, rollout, samples = first.indices, first.rollout, first.samples
      total, components = first.total, first.components
    else:  # the kept groups of all rounds, in draw order; prompts re-collated to one width
      rows = [p * g + j for p in keep for j in range(g)]
      indices = [i for r in rounds for i in r.indices]
      indices = [indices[p] for p in keep]
      rollout = take_rows(concat_rollouts([r.rollout for r in rounds]), rows)
      samples = [s for r in rounds for s in r.samples]
      samples = [samples[i] for i in rows]
      total = np.concatenate([r.total for r in rounds])[rows]
      components = {k: np.concatenate([r.components[k] for r in rounds])[rows]
                    for k in first.components}
      batch = collate_prompts([(i, self.prompt("train", i)[1]) for i in indices],
                              pipeline.pad_id(self.tokenizer))
    reasons = collections.Counter(s.reason for s in samples)
    advantages, adv_stats = adv_lib.compute_advantages(
        jnp.asarray(total, jnp.float32), g, estimator=gc.advantage)
    t2 = time.perf_counter()

    rows = training_rows(batch["input_ids"], batch["attention_mask"], rollout, g)
    work = self._work(rows, sum(r.rollout_tokens for r in rounds))
    if gc.mask_truncated_completions:
      rows["completion_mask"] = rows["completion_mask"] * ~rollout.truncated[:, None]
    rows["advantages"] = np.asarray(advantages, np.float32)
    if gc.sft_coef:
      from recllm_jax.rec.rewards import answers_target
      rows["sft_rows"] = np.asarray([answers_target(s) for s in samples], np.float32)
    rows = pipeline.host_to_global(rows, run.mesh)  # every process holds all rows
    with jax.set_mesh(run.mesh):
      if self.updates_per_step > 1:
        rows["old_logp"] = self.logprob_fn(state.params, rows)
      if self.ref_params is not None:
        rows["ref_logp"] = self.logprob_fn(self.ref_params, rows)
      elif self.ref_logprob_fn is not None:  # LoRA: the base = the policy's adapters off
        rows["ref_logp"] = self.ref_logprob_fn(state.params, rows)
      updates = []
      for _ in range(self.updates_per_step):
        state, m = self.update(state, rows)
        updates.append(jax.device_get(m))
    step = int(jax.device_get(state.step)) // self.updates_per_step
    if self.ref_sync_every:
      synced = ref_sync_due(step, self.ref_sync_every)
      if synced:  # after this step's updates: the next rollout's policy (alpha 1) is the ref
        with jax.set_mesh(run.mesh):
          self.ref_params = self._mix(state.params, self.ref_params)
      extra["ref_synced"] = int(synced)
    t3 = time.perf_counter()

    metrics: dict[str, Any] = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
    metrics["loss"], metrics["grad_norm"] = float(updates[-1]["loss"]), float(updates[-1]["grad_norm"])
    # The first update after a rollout must see ratio 1 (old = rollout policy): logged to check.
    metrics["ratio_dev_first"] = float(updates[0]["ratio_dev"])
    time_rollout = sum(r.time_rollout for r in rounds)
    time_reward = sum(r.time_reward for r in rounds)
    if gc.add_gt:
      extra["gt_added"] = sum(r.gt_added for r in rounds)
    metrics.update({
        "reward": float(np.mean(total)),
        **{f"reward/{k}": float(np.mean(v)) for k, v in components.items()},
        "completion_len": float(np.mean(rollout.lengths)),
        "frac_truncated": float(np.mean(rollout.truncated)),
        "frac_zero_std": float(adv_stats["frac_zero_std"]),
        "frac_valid": float(np.mean([s.scorable for s in samples])),
        **{f"parse/{k}": int(v) for k, v in reasons.items()},
        **extra,
        "time_rollout": time_rollout, "time_reward": time_reward,
        "time_update": t3 - t2, "time_step": time.perf_counter() - t0,
    })
    if gc.samples_every and step % gc.samples_every == 0:
      self._log_samples(step, indices, samples, total, components)
    return state, metrics, work

  def _work(self, rows: pipeline.Batch, rollout_tokens: int) -> Work:
    """Trained tokens and the step's useful model FLOPs: the rollouts (2 per matmul weight for
    each of `rollout_tokens`: prompt tokens, prefilled once per prompt, and generated tokens,
    over every dynamic-sampling round), then for every row's tokens the decoder (6N +
    attention per update, a third of it per old/ref forward) and, for completion tokens only,
    the LM head (the only positions projected)."""

    cfg = self.run.model_cfg
    head = cfg.hidden_size * cfg.vocab_size
    decoder = metrics_lib.flops_per_token(cfg, rows["input_ids"].shape[1]) - 6.0 * head
    tokens = int(rows["attention_mask"].sum())
    completion = int(rows["completion_mask"].sum())
    passes = self.updates_per_step + ((self.updates_per_step > 1) + (self.ref_params is not None or self.ref_logprob_fn is not None)) / 3
    flops = (2.0 * metrics_lib.matmul_params(cfg) * rollout_tokens
             + passes * (tokens * decoder + completion * 6.0 * head))
    return Work(tokens=tokens * self.updates_per_step, flops=flops)

  def _log_samples(self, step: int, indices: Sequence[int], samples: Sequence[Any],
                   total: np.ndarray, components: Mapping[str, np.ndarray]) -> None:
    """Appends the first prompts' completions, parsed items and rewards to samples.txt and
    TensorBoard (text)."""
    g = self.gc.num_generations
    blocks = []
    for p, index in enumerate(indices[:self.gc.num_samples_logged]):
      row = p * g
      s = samples[row]
      parts = ", ".join(f"{k}={v[row]:.3f}" for k, v in components.items())
      target = ", ".join(self.codec.text(t) for t in s.example.targets)
      blocks.append(
          f"=== step {step} | prompt {index} | reward {total[row]:.3f} ({parts})\n"
          f"--- prompt\n{self.prompt('train', index)[0]}\n--- completion\n{s.completion}\n"
          f"--- parsed: {list(s.titles)} -> {list(s.item_ids)} ({s.reason})\n"
          f"--- target: {target}\n")
    text = "\n".join(blocks)
    if jax.process_index() == 0:
      paths.append_text(self.workdir / SAMPLES_FILE, text + "\n")
      self.run.writer.write_text("samples", text, step)

  # -- evaluation -----------------------------------------------------------------------------

  def evaluate(self, state: Any) -> dict[str, float]:
    """Held-out mean reward: one greedy completion for each of the first `grpo.eval_prompts`
    valid examples (empty without a valid split)."""
    split = "valid"
    count = min(self.gc.eval_prompts, len(self.dataset.valid))
    if not count:
      return {}
    pad = pipeline.pad_id(self.tokenizer)
    size = self.config.train.batch_size * self.gc.num_generations  # a row count the mesh takes
    totals, comps, valid = [], {}, []
    for start in range(0, count, size):
      indices = list(range(start, min(start + size, count)))
      padded = indices + [indices[-1]] * (size - len(indices))
      batch = collate_prompts([(i, self.prompt(split, i)[1]) for i in padded], pad)
      rollout = self.rollout(state.params, batch, jax.random.key(0), split=split, greedy=True,
                             num_generations=1)
      keep = len(indices)
      rollout = RolloutBatch(**{f.name: _head(getattr(rollout, f.name), keep)
                                for f in dataclasses.fields(rollout)})
      samples, total, components, _ = self.score(split, indices, rollout, 1)
      totals.append(total)
      valid += [s.scorable for s in samples]
      for k, v in components.items():
        comps.setdefault(k, []).append(v)
    out = {"val_reward": float(np.mean(np.concatenate(totals))),
           "val_frac_valid": float(np.mean(valid))}
    out.update({f"val_reward/{k}": float(np.mean(np.concatenate(v))) for k, v in comps.items()})
    return out


def _head(x: Any, n: int) -> Any:
  """The first n rows of a rollout field (None stays None)."""
  return None if x is None else x[:n]


__all__ = ["GrpoTask", "ROLLOUTS", "Rollout", "SAMPLES_FILE", "collate_prompts", "grpo_loss_fn",
           "make_logprob_fn", "training_rows"]
