"""GRPO configs: `--config configs/grpo.py[:preset]`, then `--config.key=value` overrides.

GRPO starts from an SFT result: `init_from` is an SFT workdir (its latest step, or `path@step`)
or a Hugging Face directory. The model architecture and tokenizer come from there; the SFT
optimizer and data-iterator state are not restored.

Presets (one line each, as `scripts/train.py --help` lists them):
  paper       (the default) RecLLM-R1's GRPO with chain-of-thought on DeepSeek-R1-Distill-Qwen-1.5B
  tiny        a CPU smoke run from a `configs/sft.py:tiny` workdir on synthetic data (minutes)
  office      beam-rollout GRPO of a `configs/sft.py:office` semantic-ID model
  minionerec  `office` under MiniOneRec's recipe: rule + ndcg_rule, reference re-sync, cosine LR

`paper` needs --config.init_from=/path/to/sft_workdir --config.data.dir=/path/to/amazon18/Office_Products.
`minionerec` is scripts/reproduce.sh's GRPO stage (MiniOneRec's rl.sh: rewards rule +
ndcg_rule, the reference synced to the policy, cosine LR with warm-up, max_grad_norm 0.3).

Contract keys (used by scripts and docs): init_from, train.batch_size (prompts; rows =
prompts x G), train.num_steps, grpo.num_generations, grpo.beta, grpo.epsilon_low,
grpo.epsilon_high, grpo.num_iterations, grpo.loss_type, grpo.rollout, grpo.max_new_tokens,
grpo.temperature, rewards.<name> (weights of the named rewards in `recllm_jax.rec.rewards`).
0 means "never" for every *_every key.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs.sft import base_config, from_preset, office_data


def grpo_base() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "grpo"
  c.workdir = "/tmp/recllm_grpo"
  c.init_from = ""  # SFT workdir[@step] or HF directory (required)
  c.data.prompt.target_format = "cot"

  g = c.grpo = ml_collections.ConfigDict()
  g.rollout = "cot"  # cot | cot_constrained | beam
  # G: TRL's GRPOTrainer default (num_generations=8); DeepSeekMath used 64 on far larger runs.
  g.num_generations = 8
  # beta = 0.04: DeepSeekMath's GRPO (Shao et al. 2024, sec. 4.2) and TRL's original default.
  g.beta = 0.04
  # k3 = exp(d) - d - 1, d = ref - logp: DeepSeekMath's and TRL's; k1 | k2 | k3 (docs/grpo.md).
  g.kl_estimator = "k3"
  # epsilon = 0.2: PPO's clip range (Schulman et al. 2017), GRPO's default in DeepSeekMath/TRL.
  g.epsilon_low = 0.2
  g.epsilon_high = 0.2
  g.num_iterations = 1  # mu: updates per rollout (DeepSeekMath: 1)
  g.loss_type = "grpo"  # grpo | bnpo | dr_grpo | dapo
  g.advantage = "grpo"  # grpo | dr_grpo | batch (see recllm_jax.train.advantages)
  # 512 new tokens: room for a short <think> block plus the answer list.
  g.max_new_tokens = 512
  g.answer_items = 1  # titles per constrained answer (cot_constrained)
  # 0.6 / 0.95: DeepSeek-R1-Distill's generation_config.json (the model's recommended sampling).
  g.temperature = 0.6
  g.top_p = 0.95
  g.top_k = 0
  g.mask_truncated_completions = False
  g.entropy_coef = 0.0
  g.samples_every = 10  # append prompts/completions/rewards to <workdir>/samples.txt
  g.num_samples_logged = 4
  g.eval_prompts = 64  # held-out prompts for `val_reward` (greedy)
  g.fuzzy_cutoff = 0.9  # title grounding: exact, normalised, then fuzzy >= this ratio
  # Reference sync (TRL's sync_ref_model; MiniOneRec's rl.sh turns it on): after every N-th
  # step, ref = alpha * policy + (1 - alpha) * ref. 0 = a frozen reference (init_from).
  # Needs beta > 0. TRL's own defaults are 512 steps, alpha 0.6; alpha 1.0 here = hard copy.
  # The synced reference is saved with every checkpoint, so resumes are exact.
  g.ref_sync_every = 0
  g.ref_sync_alpha = 1.0  # in (0, 1]
  # Dynamic sampling (DAPO, Yu et al. 2025): drop groups whose rewards are all equal (no
  # signal) and refill the batch with further prompts' groups, at most this many extra
  # rollout rounds per step; the update always sees exactly train.batch_size groups (too few
  # with signal: the earliest zero-signal groups fill in). Logged as dynamic/*.
  g.dynamic_sampling = False
  g.dynamic_sampling_max_rounds = 3
  # MiniOneRec's add_gt (off in its rl.sh): in a beam group without the target, the lowest-
  # ranked beam (rank G-1) is replaced by the target item. beam rollouts only.
  g.add_gt = False
  # An SFT term in the loss: sft_coef * the negative log-likelihood of the rows that answer the
  # target (the hits; with add_gt every beam group has one), aggregated like the policy loss.
  # It anchors the policy to the targets while the rank penalty pushes wrong beams down.
  g.sft_coef = 0.0

  # Composite reward: weight per registered reward (recllm_jax.rec.rewards); 0 disables one.
  r = c.rewards = ml_collections.ConfigDict()
  r.format = 0.1
  r.hit = 1.0
  r.ndcg = 1.0
  r.recall = 0.0
  r.rank_aware = 0.0  # MiniOneRec's rank penalty (Hit@K hits); meaningful with rollout='beam'
  r.rule = 0.0  # MiniOneRec's rule_reward: 1 if the answer is exactly the target (= hit for beams)
  r.ndcg_rule = 0.0  # MiniOneRec's ndcg_rule_reward, exactly (exact-answer hits); see docs/grpo.md
  r.sid_prefix = 0.0  # share of the target's SID codes the answer matches from the first (SID items)
  r.diversity = 0.0
  r.novelty = 0.0
  r.business = 0.0
  r.invalid = 0.1  # penalty weights: ungrounded items, repeats, items already in the history
  r.repeat = 0.1
  r.history = 0.1
  # Your own rewards by import path: reward_fns.<name> = "package.module:function" plus a weight
  # rewards.<name>. The config is locked, so add both in a config file of your own that calls
  # this one's get_config() under `config.unlocked()`.
  c.reward_fns = ml_collections.ConfigDict()
  c.reward_k = 10  # K of hit/NDCG/recall@K
  c.business = ml_collections.ConfigDict()
  c.business.attribute = config_dict.placeholder(str)  # e.g. "brand"
  c.business.value = config_dict.placeholder(str)  # e.g. "Acme"
  c.business.item_file = config_dict.placeholder(str)  # one item id per line
  c.business.boost = 1.0

  t = c.train
  t.batch_size = 8  # prompts per step; rows = batch_size x grpo.num_generations
  return c


def paper(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.workdir = "/tmp/recllm_grpo_r1_distill_1.5b"
  c.model.preset = "hf"
  c.model.remat = True
  c.data.format = "amazon18"
  c.data.max_length = 1024
  c.train.num_steps = 500
  c.train.batch_size = 8
  # lr 1e-6, constant after warmup: DeepSeekMath's GRPO (Shao et al. 2024).
  c.train.lr = 1e-6
  c.train.min_lr_ratio = 1.0
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.workdir = "/tmp/recllm_grpo_tiny"
  c.init_from = "/tmp/recllm_sft_tiny"  # the default workdir of configs/sft.py:tiny
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPU
  c.data.format = "synthetic"
  c.data.max_length = 256
  c.data.prompt.max_history_tokens = 160
  c.grpo.num_generations = 8
  c.grpo.max_new_tokens = 96
  c.grpo.temperature = 1.0
  c.grpo.top_p = 1.0
  c.grpo.eval_prompts = 128
  c.train.num_steps = 30
  c.train.batch_size = 4
  c.train.lr = 2e-4
  c.train.min_lr_ratio = 1.0
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.0
  c.train.log_every = 1
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  return c


def office(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """GRPO of a `configs/sft.py:office` SID model, MiniOneRec-style: the group is the G best
  distinct items of a constrained beam search, rewarded for the target and its rank."""
  c = office_data(tiny(c))
  c.workdir = "/tmp/recllm_grpo_office"
  c.init_from = "/tmp/recllm_sft_office"  # the default workdir of configs/sft.py:office
  c.grpo.rollout = "beam"
  c.grpo.num_generations = 16  # MiniOneRec: 16 distinct items per prompt
  c.grpo.max_new_tokens = 8  # a SID is 3-4 tokens, then EOS
  c.grpo.beta = 1e-3  # MiniOneRec's rl.sh
  c.grpo.eval_prompts = 128
  c.rewards.format = 0.0  # a beam is always a well-formed catalog item
  c.rewards.hit = 1.0  # MiniOneRec's `rule`
  c.rewards.ndcg = 0.0
  c.rewards.rank_aware = 1.0  # close to MiniOneRec's `ndcg_rule`
  c.rewards.invalid = 0.0
  c.rewards.repeat = 0.0
  c.rewards.history = 0.0
  c.train.num_steps = 40
  c.train.batch_size = 8
  c.train.lr = 1e-4
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  return c


def minionerec(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`office` (same data, prompts, SFT init, beam rollouts, G=16, beta 1e-3) under MiniOneRec's
  GRPO recipe (MiniOneRec's rl.sh and rl.py, as in the fork github.com/wilkinszhang/MiniOneRec):
  reward_type="ranking" = rule + ndcg_rule, sync_ref_model,
  temperature 1.0, cosine LR with warm-up (warmup_ratio 0.03), max_grad_norm 0.3."""
  c = office(c)
  c.workdir = "/tmp/recllm_grpo_minionerec"
  c.rewards.hit = 0.0
  c.rewards.rank_aware = 0.0
  c.rewards.rule = 1.0
  c.rewards.ndcg_rule = 1.0
  # MiniOneRec syncs with TRL's defaults (every 512 steps, alpha 0.6) over ~2 epochs of its
  # data; a 40-step run would never reach step 512, so every 10 steps here (4 syncs), with
  # TRL's alpha 0.6.
  c.grpo.ref_sync_every = 10
  c.grpo.ref_sync_alpha = 0.6
  c.grpo.temperature = 1.0
  c.grpo.top_p = 1.0
  c.grpo.add_gt = False  # MiniOneRec's default
  c.grpo.dynamic_sampling = False  # MiniOneRec's rl.sh
  # Cosine to 0 after a linear warm-up of ~3% of the run (2 of 40 steps). lr 3e-5: from the
  # lr 1.5e-3 `configs/sft.py:office` SFT, 1e-4 drifts (NDCG@10 0.931x its SFT over 3 seeds on
  # whole held-out users) and 3e-5 does not (1.003x; docs/grpo.md). MiniOneRec's 1e-5 is for
  # a 1.5B+ model.
  c.train.lr = 3e-5
  c.train.warmup_steps = 2
  c.train.min_lr_ratio = 0.0
  c.train.max_grad_norm = 0.3
  return c


PRESETS = {"": paper, "paper": paper, "tiny": tiny, "office": office, "minionerec": minionerec}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return from_preset(PRESETS, grpo_base, arg, "configs/grpo.py")
