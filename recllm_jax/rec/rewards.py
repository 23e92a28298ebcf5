"""Composite rewards for GRPO on recommendation completions (RecLLM-R1 style).

RecLLM-R1 (arXiv 2506.19235) trains with GRPO and scores each sampled
completion with a weighted sum of rule-based rewards: format, accuracy
(hit, NDCG, recall), diversity, novelty and business rules. This module
holds those rewards as small pure functions so that each one is testable
by hand and a user can add their own by import path.

Vocabulary:

* A **completion** is parsed (``data.prompts.parse_completion``) into titles
  and a parse ``reason``; the titles are grounded to ids
  (:class:`~recllm_jax.rec.grounding.Grounder`). :func:`build_samples` bundles
  example, text, titles, ids and the completion's group into a
  :class:`Sample`.
* A reward is ``fn(sample: Sample, ctx: RewardContext) -> float`` registered
  by name in :data:`REWARDS` (``@register("name")``). Every reward is a
  function of its sample and the shared context only, so rewards can run in
  any order or in parallel on the host.
* Only the first ``ctx.k`` titles of an answer are scored ("top-K"). A *slot*
  is one of those titles; the *valid list* is the distinct grounded ids among
  them, first occurrence order. Ungrounded titles and repeats still occupy
  their slot, so wasted slots push real hits down the ranking.

Malformed completions (parse reason != "ok") and answers none of whose
titles ground (reason ``"unknown_item"``) score 0 on every accuracy,
diversity, novelty and business reward and never raise. Two kinds of
reward deliberately differ, so that under non-negative weights of the
built-in rewards a malformed answer never scores above a well-formed wrong
one at the same group rank:

* penalties (``invalid``, ``repeat``, ``history``) are in ``[-1, 0]`` and a
  malformed completion takes the minimum, -1, on each;
* ``rank_aware`` treats a malformed completion as a wrong one.

``format`` is 1 only for a well-formed completion (parse reason "ok"); an
answer whose titles parse but do not ground is still well-formed (format 1)
and is punished by ``invalid`` instead, so the two failure modes stay
separately visible in the logged components.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from recllm_jax.data import Catalog, DataError, Example, popularity
from recllm_jax.data.items import ItemCodec
from recllm_jax.data.sids import parse_sid
from recllm_jax.errors import ConfigError
from recllm_jax.rec.grounding import Grounder, title_tokens
from recllm_jax.registry import Registry

__all__ = [
  "REASON_OK",
  "REASON_UNKNOWN_ITEM",
  "REWARDS",
  "BusinessRule",
  "RewardContext",
  "RewardFn",
  "Sample",
  "answers_target",
  "build_samples",
  "composite_rewards",
  "hit_at_k",
  "load_item_ids",
  "ndcg_at_k",
  "rank_penalties",
  "ranks_from_scores",
  "recall_at_k",
  "register",
  "resolve_reward",
]

REASON_OK = "ok"
REASON_UNKNOWN_ITEM = "unknown_item"


# --------------------------------------------------------------------------
# Ranking metrics on id lists (shared by rewards and offline evaluation)
# --------------------------------------------------------------------------


def _first_ranks(ranked: Sequence[str | None], targets: Iterable[str], k: int) -> list[int]:
  """0-based rank of the first occurrence of each target found in ``ranked[:k]``."""
  wanted = set(targets)
  ranks = []
  for rank, item_id in enumerate(ranked[:k]):
    if item_id in wanted:
      ranks.append(rank)
      wanted.discard(item_id)  # a repeated target earns nothing twice
  return ranks


def hit_at_k(ranked: Sequence[str | None], targets: Iterable[str], k: int) -> float:
  """1.0 if any target is among the first ``k`` ids, else 0.0."""
  return 1.0 if _first_ranks(ranked, targets, k) else 0.0


def ndcg_at_k(ranked: Sequence[str | None], targets: Sequence[str], k: int) -> float:
  """Binary-relevance NDCG@k with gain ``1 / log2(rank + 2)``, 0-based rank.

  The ideal DCG places ``min(len(targets), k)`` targets at ranks 0, 1, ...;
  with one target the score is simply ``1 / log2(rank + 2)``.
  """
  ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(set(targets)), k)))
  if ideal == 0.0:
    return 0.0
  return sum(1.0 / math.log2(r + 2) for r in _first_ranks(ranked, targets, k)) / ideal


def recall_at_k(ranked: Sequence[str | None], targets: Sequence[str], k: int) -> float:
  """Fraction of the distinct targets found among the first ``k`` ids."""
  distinct = set(targets)
  return len(_first_ranks(ranked, distinct, k)) / len(distinct) if distinct else 0.0


def rank_penalties(group_size: int) -> np.ndarray:
  """MiniOneRec's rank penalties for a group of ``group_size`` completions.

  ``p[r] = -(1 / log2(r + 2)) / sum_j (1 / log2(j + 2))`` for ranks
  ``r = 0 .. group_size - 1``: negative, summing to -1, largest in size at
  rank 0. Source: MiniOneRec's ranking reward (arXiv 2510.24431, the RL
  section), as ``ndcg_rewards`` / ``ndcg_rule_reward`` in the released
  ``rl.py`` (seen in the fork github.com/wilkinszhang/MiniOneRec, commit
  255e7bc). Later upstream versions replaced it with a positive
  ``1 / log2(r + 2)`` gain for the target; this module keeps the penalty
  form, which is what the paper describes.
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  gains = 1.0 / np.log2(np.arange(group_size, dtype=np.float64) + 2.0)  # [G]
  return -gains / gains.sum()


def ranks_from_scores(scores: Sequence[float] | np.ndarray, group_size: int) -> np.ndarray:
  """Group ranks ``[N]`` (0 = best) from per-completion scores laid out ``[B, G]``.

  Within each group of ``group_size`` consecutive rows, the highest score gets
  rank 0; ties keep their row order. Used for the sampling rollouts, whose rows
  come in sampling order (a beam's rows are already in rank order).
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1, group_size)  # [B, G]
  order = np.argsort(-scores, axis=1, kind="stable")  # [B, G] row of rank r
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(group_size)[None, :], axis=1)
  return ranks.reshape(-1)


# --------------------------------------------------------------------------
# Context and samples
# --------------------------------------------------------------------------


def _attribute_values(value: Any) -> list[Any]:
  """Flatten list/tuple attribute values (Amazon ``categories`` nest lists)."""
  if isinstance(value, (list, tuple)):
    return [v for part in value for v in _attribute_values(part)]
  return [value]


def _present(value: Any) -> bool:
  return value is not None and value != "" and value != [] and value != ()


def load_item_ids(path: str | os.PathLike[str], catalog: Catalog | None = None) -> frozenset[str]:
  """Read item ids, one per line; blank lines and ``#`` comments are skipped.

  With ``catalog`` given, an id missing from it raises :class:`DataError`
  naming ``path:line``, because a typo in a promotion list would otherwise
  silently promote nothing.
  """
  ids = set()
  try:
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        item_id = line.strip()
        if not item_id or item_id.startswith("#"):
          continue
        if catalog is not None and item_id not in catalog:
          raise DataError(f"item id {item_id!r} is not in the catalog", path=path, line=lineno, item_id=item_id)
        ids.add(item_id)
  except FileNotFoundError as e:
    raise DataError("file not found", path=path) from e
  return frozenset(ids)


@dataclasses.dataclass(frozen=True)
class BusinessRule:
  """Items a business wants promoted: an attribute value and/or an id list.

  An item matches when ``item.attributes[attribute] == value`` (or ``value``
  is one of its values, for list attributes such as ``categories``) *or* its
  id is in ``item_ids``. ``boost`` scales the ``business`` reward.
  """

  attribute: str | None = None
  value: Any = None
  item_ids: frozenset[str] = frozenset()
  boost: float = 1.0

  def __post_init__(self) -> None:
    object.__setattr__(self, "item_ids", frozenset(self.item_ids))
    if self.attribute is None and not self.item_ids:
      raise ConfigError("a business rule needs an attribute (with a value) or item ids")
    if (self.attribute is None) != (self.value is None):
      raise ConfigError(f"business rule attribute and value go together, got {self.attribute!r} = {self.value!r}")

  @classmethod
  def from_file(
    cls,
    path: str | os.PathLike[str],
    *,
    boost: float = 1.0,
    catalog: Catalog | None = None,
    attribute: str | None = None,
    value: Any = None,
  ) -> BusinessRule:
    """A rule whose ids come from ``path`` (see :func:`load_item_ids`)."""
    return cls(attribute=attribute, value=value, item_ids=load_item_ids(path, catalog), boost=boost)

  def matches(self, item_id: str, catalog: Catalog) -> bool:
    if item_id in self.item_ids:
      return True
    if self.attribute is None or item_id not in catalog:
      return False
    return self.value in _attribute_values(catalog[item_id].attributes.get(self.attribute))


@dataclasses.dataclass(frozen=True)
class RewardContext:
  """What rewards share: the catalog, training popularity and settings.

  ``popularity`` must count *training* interactions only (see
  :func:`RewardContext.from_dataset`); counting evaluation targets would leak
  them into novelty. ``diversity_attributes`` name the attributes whose
  values describe an item for the ``diversity`` reward. ``codec`` is the run's item codec;
  ``sid_prefix`` reads the items' semantic IDs from it (None, or a title codec: no SIDs).
  """

  catalog: Catalog
  popularity: Mapping[str, int]
  k: int = 10
  business_rule: BusinessRule | None = None
  diversity_attributes: tuple[str, ...] = ("brand", "categories")
  codec: ItemCodec | None = None

  def __post_init__(self) -> None:
    if self.k < 1:
      raise ValueError(f"k must be >= 1, got {self.k}")
    object.__setattr__(self, "diversity_attributes", tuple(self.diversity_attributes))

  @classmethod
  def from_dataset(cls, dataset: Any, **kwargs: Any) -> RewardContext:
    """Context for a ``RecDataset``: its catalog and train-split popularity."""
    return cls(catalog=dataset.catalog, popularity=popularity(dataset.train), **kwargs)

  @functools.cached_property
  def _novelty_scale(self) -> tuple[float, float]:
    """``(total + V, log(total + V))`` for :meth:`novelty`."""
    n = float(sum(self.popularity.values()) + len(self.catalog))
    return n, math.log(n) if n > 1.0 else 0.0

  def novelty(self, item_id: str) -> float:
    """Normalised self-information of an item, in ``[0, 1]``.

    ``-log p / log(total + V)`` with add-one smoothed popularity
    ``p = (count + 1) / (total + V)`` (``total``: all training interactions,
    ``V``: catalog size). An item never seen in training scores 1, the most
    popular items approach 0; the scale does not depend on the answer.
    """
    n, log_n = self._novelty_scale
    if log_n == 0.0:
      return 0.0
    return math.log(n / (self.popularity.get(item_id, 0) + 1)) / log_n

  @functools.cached_property
  def _sid_codes(self) -> dict[str, tuple[int, ...]]:
    sids = getattr(self.codec, "sids", None) or {}
    return {item_id: parse_sid(sid) for item_id, sid in sids.items()}

  def sid_codes(self, item_id: str) -> tuple[int, ...]:
    """The item's semantic-ID codes (``<a_3><b_9>`` -> ``(3, 9)``); () without SIDs."""
    return self._sid_codes.get(item_id, ())

  def features(self, item_id: str) -> frozenset[Any]:
    """``(attribute, value)`` pairs of ``diversity_attributes`` the item has."""
    attrs = self.catalog[item_id].attributes
    return frozenset(
      (name, v) for name in self.diversity_attributes for v in _attribute_values(attrs.get(name)) if _present(v)
    )


class ParsedLike(Protocol):  # data.prompts.ParsedCompletion
  titles: Sequence[str]
  reason: str


@dataclasses.dataclass(frozen=True)
class Sample:
  """One scored completion and what group-aware rewards need of its group.

  ``item_ids``/``matches`` are aligned with ``titles`` (``None``: ungrounded).
  ``group_rank`` is the completion's rank in its GRPO group, 0-based (0 = best):
  the beam order in ``beam`` rollouts, descending sequence log-prob in the
  sampling rollouts (``GrpoTask.score`` always passes it explicitly; rank-aware
  rewards read this field, never the sample's position). ``group_items`` holds
  every group member's ``item_ids`` (this sample's included), in group order.
  """

  example: Example
  completion: str
  titles: tuple[str, ...]
  item_ids: tuple[str | None, ...]
  parse_reason: str
  matches: tuple[str | None, ...] = ()
  group_rank: int = 0
  group_items: tuple[tuple[str | None, ...], ...] = ()

  @property
  def well_formed(self) -> bool:
    return self.parse_reason == REASON_OK

  @property
  def reason(self) -> str:
    """Parse reason, or ``"unknown_item"`` if it parsed but no title grounds."""
    if not self.well_formed:
      return self.parse_reason
    return REASON_OK if any(i is not None for i in self.item_ids) else REASON_UNKNOWN_ITEM

  @property
  def scorable(self) -> bool:
    """Whether content rewards apply (well-formed and at least one grounded title)."""
    return self.reason == REASON_OK

  def top_k(self, k: int) -> tuple[str | None, ...]:
    return self.item_ids[:k]

  def valid_items(self, k: int) -> tuple[str, ...]:
    """Distinct grounded ids among the first ``k`` titles, first occurrence order."""
    return tuple(dict.fromkeys(i for i in self.item_ids[:k] if i is not None))


def build_samples(
  examples: Sequence[Example],
  completions: Sequence[str],
  parsed: Sequence[ParsedLike],
  grounder: Grounder,
  *,
  group_size: int,
  group_ranks: Sequence[int] | None = None,
) -> list[Sample]:
  """Parse results + grounding -> samples, for completions laid out ``[B, G]``.

  ``examples`` has one entry per group (``B``); ``completions``, ``parsed``
  and ``group_ranks`` are group-major with ``B * G`` entries (completion
  ``b * G + g`` answers ``examples[b]``). ``group_ranks`` (each group's a
  permutation of ``0 .. G-1``) becomes ``Sample.group_rank``; without it the
  position in the group is taken as the rank, which is right only for rows in
  rank order (beams; see :func:`ranks_from_scores` for sampled rows).
  """
  n = len(examples) * group_size
  if group_size < 1 or len(completions) != n or len(parsed) != n:
    raise ValueError(
      f"expected {len(examples)} examples x group_size {group_size} = {n} completions and parses, "
      f"got {len(completions)} completions and {len(parsed)} parses"
    )
  ranks = list(range(group_size)) * len(examples) if group_ranks is None else list(group_ranks)
  if len(ranks) != n:
    raise ValueError(f"group_ranks has {len(ranks)} entries, expected {n}")
  samples = []
  for b, example in enumerate(examples):
    span = range(b * group_size, (b + 1) * group_size)
    if sorted(ranks[i] for i in span) != list(range(group_size)):
      raise ValueError(f"group {b}: group_ranks {[ranks[i] for i in span]} is not a permutation of 0..{group_size - 1}")
    grounded = [grounder.ground(parsed[i].titles) for i in span]
    group_items = tuple(g.item_ids for g in grounded)
    for i, g in zip(span, grounded):
      samples.append(
        Sample(
          example=example,
          completion=completions[i],
          titles=g.titles,
          item_ids=g.item_ids,
          parse_reason=parsed[i].reason,
          matches=g.matches,
          group_rank=ranks[i],
          group_items=group_items,
        )
      )
  return samples


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

RewardFn = Callable[[Sample, RewardContext], float]
REWARDS: Registry[RewardFn] = Registry("reward", "rewards.{name}")
register = REWARDS.register


def resolve_reward(name: str, import_path: str | None = None) -> RewardFn:
  """The reward called ``name``: imported from ``"pkg.module:function"`` if given, else built-in."""
  if import_path is None:
    if name not in REWARDS:
      raise ConfigError(
        f"unknown reward rewards.{name}; built-in rewards are {sorted(REWARDS)}, "
        f'or give an import path as reward_fns.{name} = "package.module:function"'
      )
    return REWARDS[name]
  if name in REWARDS:
    raise ConfigError(f"reward_fns.{name} would shadow the built-in reward {name!r}; choose another name")
  module_name, sep, attr = import_path.partition(":")
  if not sep or not module_name or not attr:
    raise ConfigError(f'reward_fns.{name} = {import_path!r}: expected "package.module:function"')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"reward_fns.{name} = {import_path!r}: cannot import {module_name!r}: {e}") from e
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise ConfigError(f"reward_fns.{name} = {import_path!r}: {module_name!r} has no attribute {attr!r}")
  if not callable(fn):
    raise ConfigError(f"reward_fns.{name} = {import_path!r} is not callable")
  return fn


def composite_rewards(
  samples: Sequence[Sample],
  weights: Mapping[str, float],
  ctx: RewardContext,
  import_paths: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], collections.Counter[str]]:
  """Weighted sum of rewards over samples.

  Returns ``(total [N], components {name: [N]}, reason_counts)``; every
  reward named in ``weights`` is computed and reported, so a weight of 0
  logs a reward without training on it. ``import_paths`` maps a name to a
  custom reward's ``"package.module:function"`` (config ``reward_fns``);
  each such name needs a weight.
  """
  import_paths = dict(import_paths or {})
  unweighted = sorted(set(import_paths) - set(weights))
  if unweighted:
    raise ConfigError(f"reward_fns {unweighted} have no weight; set rewards.<name> = weight for each")
  fns = {name: resolve_reward(name, import_paths.get(name)) for name in weights}
  components: dict[str, np.ndarray] = {}
  for name, fn in fns.items():
    values = np.array([fn(s, ctx) for s in samples], dtype=np.float64)  # [N]
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise ValueError(f"reward {name!r} returned {values[bad[0]]} for sample {bad[0]}; rewards must be finite")
    components[name] = values
  total = np.zeros(len(samples), dtype=np.float64)  # [N]
  for name, values in components.items():
    total += float(weights[name]) * values
  reason_counts = collections.Counter(s.reason for s in samples)
  return total, components, reason_counts


# --------------------------------------------------------------------------
# Built-in rewards
# --------------------------------------------------------------------------


@register("format")
def format_reward(sample: Sample, ctx: RewardContext) -> float:
  """1 for a well-formed completion (parse reason "ok"), else 0."""
  return 1.0 if sample.well_formed else 0.0


@register("hit")
def hit_reward(sample: Sample, ctx: RewardContext) -> float:
  """Hit@K: 1 if a target is among the first K titles."""
  return hit_at_k(sample.top_k(ctx.k), sample.example.targets, ctx.k) if sample.scorable else 0.0


@register("ndcg")
def ndcg_reward(sample: Sample, ctx: RewardContext) -> float:
  """NDCG@K of the answer against the targets (see :func:`ndcg_at_k`)."""
  return ndcg_at_k(sample.top_k(ctx.k), sample.example.targets, ctx.k) if sample.scorable else 0.0


@register("recall")
def recall_reward(sample: Sample, ctx: RewardContext) -> float:
  """Recall@K: fraction of the targets among the first K titles."""
  return recall_at_k(sample.top_k(ctx.k), sample.example.targets, ctx.k) if sample.scorable else 0.0


@register("rank_aware")
def rank_aware_reward(sample: Sample, ctx: RewardContext) -> float:
  """MiniOneRec's ranking reward, applied to whole answers.

  In a group where some completion hits a target (Hit@K), a completion that
  misses (malformed ones included) gets ``rank_penalties(G)[group_rank]``,
  so confident (high-ranked) wrong answers cost most; a hitting completion,
  and every completion of a group without a hit, gets 0. MiniOneRec pairs
  it with a 0/1 hit reward (``reward_type="ranking"``). Its exact form, with
  MiniOneRec's exact-answer hit, is ``ndcg_rule``; the two agree on one-item
  answers (every ``beam`` completion) and differ for multi-item answers.
  """
  targets = sample.example.targets
  return _group_rank_penalty(sample, sample.top_k(ctx.k),
                             lambda items: hit_at_k(items, targets, ctx.k) > 0)


def _group_rank_penalty(sample: Sample, answer: Sequence[str | None],
                        is_hit: Callable[[Sequence[str | None]], bool]) -> float:
  """The ranking rewards' shared rule: ``rank_penalties(G)[group_rank]`` for a completion that
  misses (`is_hit(answer)` false, or unscorable) in a group where some completion hits; 0 for a
  hit and for every completion of a group without one."""
  group = sample.group_items or (sample.item_ids,)
  if (sample.scorable and is_hit(answer)) or not any(is_hit(items) for items in group):
    return 0.0
  return float(rank_penalties(len(group))[sample.group_rank])


def _exact_hit(items: Sequence[str | None], targets: Iterable[str]) -> bool:
  """MiniOneRec's hit: the completion answers exactly one item, and it is a target
  (its ``completion == target`` string test, on grounded ids)."""
  return len(items) == 1 and items[0] is not None and items[0] in set(targets)


@register("rule")
def rule_reward(sample: Sample, ctx: RewardContext) -> float:
  """MiniOneRec's ``rule_reward``: 1 if the answer is exactly the target item, else 0.

  Equal to ``hit`` for one-item answers (every ``beam`` completion); an answer
  listing several items scores 0 even when one of them is the target.
  """
  return 1.0 if answers_target(sample) else 0.0


def answers_target(sample: Sample) -> bool:
  """Whether the sample's answer is exactly the target item (what `rule` rewards)."""
  return sample.scorable and _exact_hit(sample.item_ids, sample.example.targets)


@register("ndcg_rule")
def ndcg_rule_reward(sample: Sample, ctx: RewardContext) -> float:
  """MiniOneRec's ``ndcg_rule_reward``, exactly (released ``rl.py``, ``reward_type="ranking"``).

  In a group where some completion is exactly the target (:func:`rule_reward`),
  every other completion gets ``rank_penalties(G)[group_rank]`` =
  ``-(1 / log2(r + 2)) / sum_j 1 / log2(j + 2)`` and the hit gets 0; in a group
  without a hit every completion gets 0. The rank is ``sample.group_rank``
  (MiniOneRec uses the row's position ``i % G``, which is the beam order).
  Differs from ``rank_aware`` only in what counts as a hit: the exact answer
  here, Hit@K over a multi-item answer there (see docs/grpo.md).
  """
  targets = sample.example.targets
  return _group_rank_penalty(sample, sample.item_ids, lambda items: _exact_hit(items, targets))


@register("sid_prefix")
def sid_prefix_reward(sample: Sample, ctx: RewardContext) -> float:
  """Partial credit on the semantic-ID path: the share of the target's SID codes that the
  answer's first item matches from the first code on (the best over targets).

  ``<a_3><b_9><c_1>`` against the target ``<a_3><b_9><c_4>`` scores 2/3, the target itself 1,
  a different first code 0. Items that share a SID prefix are similar items, so the reward
  orders a group's wrong beams by how near they came, in the groups without an exact hit too,
  where ``rule`` and ``ndcg_rule`` are flat. 0 for unscorable answers and on the title path
  (``GrpoTask.check_config`` refuses a nonzero weight there).
  """
  first = sample.item_ids[0] if sample.scorable and sample.item_ids else None
  answer = ctx.sid_codes(first) if first is not None else ()
  if not answer:
    return 0.0
  best = 0.0
  for target in sample.example.targets:
    codes = ctx.sid_codes(target)
    if codes:
      shared = next((i for i, (a, b) in enumerate(zip(answer, codes)) if a != b),
                    min(len(answer), len(codes)))
      best = max(best, shared / len(codes))
  return best


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
  union = len(a | b)
  return len(a & b) / union if union else 1.0


@register("diversity")
def diversity_reward(sample: Sample, ctx: RewardContext) -> float:
  """Intra-list dissimilarity: ``1 - mean pairwise Jaccard`` of the valid list.

  Items are described by their ``ctx.diversity_attributes`` values when every
  item in the list has at least one, else by title word tokens (mixing the
  two would make every mixed pair look fully dissimilar). Lists with fewer
  than two valid items score 0: there is nothing to be diverse about.
  """
  items = sample.valid_items(ctx.k) if sample.scorable else ()
  if len(items) < 2:
    return 0.0
  feats = [ctx.features(i) for i in items]
  if not all(feats):
    feats = [title_tokens(ctx.catalog.title(i)) for i in items]
  sims = [_jaccard(feats[a], feats[b]) for a in range(len(items)) for b in range(a + 1, len(items))]
  return 1.0 - sum(sims) / len(sims)


@register("novelty")
def novelty_reward(sample: Sample, ctx: RewardContext) -> float:
  """Mean :meth:`RewardContext.novelty` of the valid list (0 if empty)."""
  items = sample.valid_items(ctx.k) if sample.scorable else ()
  return sum(ctx.novelty(i) for i in items) / len(items) if items else 0.0


@register("business")
def business_reward(sample: Sample, ctx: RewardContext) -> float:
  """``boost`` x fraction of the valid list matching ``ctx.business_rule`` (0 without a rule)."""
  rule = ctx.business_rule
  items = sample.valid_items(ctx.k) if sample.scorable else ()
  if rule is None or not items:
    return 0.0
  return rule.boost * sum(rule.matches(i, ctx.catalog) for i in items) / len(items)


def _slot_penalty(sample: Sample, ctx: RewardContext, bad: Callable[[int, str | None], bool]) -> float:
  """``-(bad slots / slots)`` over the first K titles; -1 for a malformed or empty answer."""
  slots = sample.top_k(ctx.k)
  if not sample.well_formed or not slots:
    return -1.0
  return -sum(bad(pos, item_id) for pos, item_id in enumerate(slots)) / len(slots)


@register("invalid")
def invalid_penalty(sample: Sample, ctx: RewardContext) -> float:
  """Minus the fraction of top-K titles that ground to no catalog item."""
  return _slot_penalty(sample, ctx, lambda pos, item_id: item_id is None)


@register("repeat")
def repeat_penalty(sample: Sample, ctx: RewardContext) -> float:
  """Minus the fraction of top-K titles grounding to an id already answered earlier."""
  slots = sample.top_k(ctx.k)
  return _slot_penalty(sample, ctx, lambda pos, item_id: item_id is not None and item_id in slots[:pos])


@register("history")
def history_penalty(sample: Sample, ctx: RewardContext) -> float:
  """Minus the fraction of top-K titles that are items in the user's history."""
  history = frozenset(sample.example.history)
  return _slot_penalty(sample, ctx, lambda pos, item_id: item_id in history)
