"""Top-K recommendation from a trained LLM: the one inference path evaluation, the demo and users share.

`recommend(model, tokenizer, examples, catalog, prompt_cfg, k=...)` turns examples into ranked
catalog item ids, best first, so that `recllm_jax.rec.metrics.evaluate_rankings` can score the
LLM exactly like the baselines. Prompts, the catalog trie and reading answers back to item ids
are `recllm_jax.rollout.ItemRollout`'s, the rollout path GRPO trains with; this module adds
batching on the mesh and the ranking of each example's G completions. Items are written by the
run's item codec (`recllm_jax.data.items`: titles or semantic IDs).

Modes:

* ``beam`` (default): constrained beam search with K beams over direct-format prompts (plus the
  answer prefix when the chat template opens a think block). Beams are trie paths, so the K
  results are distinct catalog titles ranked by model log-probability (D3 / MiniOneRec).
  With a ``cf_prior`` (e.g. `recllm_jax.rec.cf_prior.fit_prior`) the ranking score is
  ``log p_LLM(title) + cf_weight * log p_CF(item | history)``, mixed into the beam at every
  step (CF-guided decoding, D3; see `decoding.beam_search`).
* ``cot_constrained``: G samples that reason freely, then answer under the catalog trie once
  they write "<answer>\\n" (a `cot` prompt config); items ranked by how many samples chose them,
  ties by the best answer log-probability.
* ``sample``: G unconstrained samples, parsed and grounded to the catalog (exact, normalised,
  fuzzy); ranked by votes like ``cot_constrained``. A title that grounds to nothing keeps its
  rank as an invalid slot (``None``), which is what ``valid_rate`` measures.

Bad inputs are one-line `recllm_jax.errors.UserError`s raised before anything is decoded:
`ExampleError` for an empty history or a history entry that is not an item id of the catalog
(a title, a SID or an unknown id), naming the example (index and user id) and the entry;
`CatalogMismatchError` for a catalog (codec, trie) the model was not trained on (semantic IDs
whose tokens the model lacks, titles for a model trained on SIDs) and, in `check_trained_catalog`,
for data whose catalog differs from the one a training run's fingerprint names. A history longer
than the prompt budget (``max_history_tokens``) is no error: the prompt keeps its newest items
and `Recommendations.histories_cut` counts the examples cut.

Compiled shapes stay few: every batch has the same number of rows (the last one is padded by
repeating its last example; a multiple of the mesh's batch devices), prompts are left-padded to
a geometric length bucket, and the history width of ``exclude_history`` is bucketed too.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from recllm_jax import buckets
from recllm_jax import constraints as cons
from recllm_jax import sharding
from recllm_jax.data.items import ItemCodec, as_codec
from recllm_jax.errors import UserError
from recllm_jax.rollout import (MODES, ItemRollout, collate_prompts, history_rows,
                                mode_prompt_config, render_prompt)

prompt_ids = render_prompt  # (example, catalog or codec, tokenizer, prompt_cfg, mode) -> (text, ids)

__all__ = ["MODES", "DEFAULT_SAMPLE_TOKENS", "CatalogMismatchError", "ExampleError",
           "Recommendations", "UNKNOWN_TARGET", "as_examples", "batch_rows", "check_codec", "check_examples",
           "check_trained_catalog", "history_rows", "mode_prompt_config", "prompt_ids",
           "rank_by_votes", "recommend"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_TOKENS = 256  # max_new_tokens of the sampling modes when not given


class ExampleError(UserError, ValueError):
  """An example `recommend` cannot answer: an empty history, or a history entry that is not an
  item id of the catalog. `index`, `user_id` and `item` (None for an empty history) name it."""

  def __init__(self, message: str, *, index: int, user_id: Any, item: Any = None) -> None:
    self.index, self.user_id, self.item = index, user_id, item
    super().__init__(f"example {index} (user {user_id!r}): {message}")


class CatalogMismatchError(UserError, ValueError):
  """The catalog (its codec, its trie) is not the one the model was trained on."""


class Recommendations(list):
  """`recommend`'s result: a plain list with one ranked list of ids per example, plus
  `histories_cut`: how many examples had a history longer than the prompt budget
  (`PromptConfig.max_history_tokens`), whose prompts show only its newest items."""

  histories_cut: int = 0


def _misnamed(item: Any, codec: ItemCodec) -> str:
  """Why a history entry that is no item id of `codec`'s catalog is not one."""
  if isinstance(item, str):
    for noun, ids in (("title", codec.catalog.ids_for_title(item)),
                      (codec.noun, codec.ids_for_text(item))):
      if ids:
        return (f"is the {noun} of {', '.join(map(repr, ids[:3]))}, not an item id: histories "
                "hold catalog item ids")
  return (f"is not in the catalog ({len(codec.catalog)} items): neither an item id nor the "
          f"{codec.noun} of one")


UNKNOWN_TARGET = "<unknown>"  # the target of a history given bare: recommend never reads targets


def as_examples(users: Sequence[Any]) -> list[Any]:
  """`Example`s as they are; a bare history (a sequence of item ids, oldest first) becomes an
  `Example` of user "user<i>" whose next item is unknown."""
  from recllm_jax.data.schema import Example

  return [u if isinstance(u, Example)
          else Example(f"user{i}", tuple(u), targets=(UNKNOWN_TARGET,))
          for i, u in enumerate(users)]


def check_examples(examples: Sequence[Any], catalog: Any) -> None:
  """Raises `ExampleError` for the first example with an empty history or a history entry that
  is not an item id of `catalog` (a `Catalog` or an `ItemCodec`)."""
  codec = as_codec(catalog)
  for index, ex in enumerate(examples):
    if not ex.history:
      raise ExampleError("the history is empty: recommend needs at least one item the user "
                         "interacted with", index=index, user_id=ex.user_id)
    for pos, item in enumerate(ex.history):
      if item not in codec.catalog:
        raise ExampleError(f"history[{pos}] {item!r} {_misnamed(item, codec)}", index=index,
                           user_id=ex.user_id, item=item)


def _sid_level0(token: str) -> bool:
  """Whether `token` is a first-level semantic-ID token (``<a_12>``)."""
  from recllm_jax.data.sids import parse_sid

  try:
    return len(parse_sid(token)) == 1
  except ValueError:
    return False


def check_codec(catalog: Any, tokenizer: Any, vocab_size: int,
                trie: cons.ItemTrie | None = None) -> None:
  """Raises `CatalogMismatchError` when `catalog` (a `Catalog` or an `ItemCodec`) cannot be the
  item format and catalog of a model with this tokenizer and `vocab_size` logits: semantic IDs
  with tokens the model lacks, titles for a model whose tokenizer has SID tokens, or a `trie`
  of another catalog or vocabulary."""
  codec = as_codec(catalog)
  if hasattr(tokenizer, "get_vocab"):
    vocab = tokenizer.get_vocab()
    missing = [t for t in codec.new_tokens() if vocab.get(t, vocab_size) >= vocab_size]
    if missing:
      raise CatalogMismatchError(
          f"the catalog's semantic IDs use {len(missing)} tokens the model does not have (first: "
          f"{missing[0]!r}): it was trained on another catalog, other SIDs or titles; pass the "
          "catalog and item codec it was trained with (its data.dir and data.item_format)")
    if not codec.new_tokens() and hasattr(tokenizer, "get_added_vocab"):
      sids = [t for t in tokenizer.get_added_vocab() if _sid_level0(t)]
      if sids:
        raise CatalogMismatchError(
            f"the model writes items as semantic IDs (its tokenizer has {len(sids)} first-level "
            f"SID tokens such as {sids[0]!r}), but the catalog is given as titles: pass its SID "
            "codec, recllm_jax.data.items.make_codec('sid', catalog, data_dir)")
  if trie is not None and (trie.item_ids != tuple(item.item_id for item in codec.catalog)
                           or trie.vocab_size != vocab_size):
    raise CatalogMismatchError(
        f"trie= has {trie.num_items} items over {trie.vocab_size} token ids, not this catalog's "
        f"{len(codec.catalog)} over the model's {vocab_size}: build it with ItemTrie.from_codec("
        "codec, tokenizer, vocab_size=model.cfg.vocab_size)")


def check_trained_catalog(dataset: Any, workdir: str | os.PathLike[str],
                          data_dir: str | os.PathLike[str] = "") -> None:
  """Raises `CatalogMismatchError` when `dataset`'s catalog is not the one the run in `workdir`
  was trained on: its item ids in catalog order, by the data fingerprint training saved there
  (`recllm_jax.train.drift`). A workdir without one is not checked."""
  from recllm_jax.rec.cf_prior import data_fingerprint
  from recllm_jax.train.drift import DATA_FINGERPRINT_FILE, read_data_fingerprint

  saved = read_data_fingerprint(workdir)
  if saved is None:
    return
  now = data_fingerprint(dataset)
  if (saved.get("num_items"), saved.get("items_sha256")) == (now["num_items"],
                                                              now["items_sha256"]):
    return
  what = (f"{saved.get('num_items')} items -> {now['num_items']}"
          if saved.get("num_items") != now["num_items"] else
          f"{now['num_items']} items either way, but other ids or another order")
  raise CatalogMismatchError(
      f"data.dir={os.fspath(data_dir)!r} has another catalog than the one {os.fspath(workdir)} "
      f"was trained on ({what}; items_sha256 of its {DATA_FINGERPRINT_FILE}): evaluate with the "
      "data it was trained on")


def batch_rows(count: int, batch_size: int, multiple: int) -> Iterator[list[int]]:
  """Example indices in batches of one fixed size (a multiple of `multiple`, at most
  `batch_size` rounded up, no larger than `count` needs); the last batch repeats its last index."""
  size = buckets.round_up(max(1, min(batch_size, count)), multiple)
  for start in range(0, count, size):
    rows = list(range(start, min(start + size, count)))
    yield rows + [rows[-1]] * (size - len(rows))


def rank_by_votes(votes: Sequence[tuple[Sequence[tuple[str | None, str]], float]],
                  k: int) -> list[str | None]:
  """Rank the answers of G samples of one example, best first, at most `k`.

  `votes[g]` = (answers, score): sample g's (item id or None, title) pairs and its
  log-probability. An item ranks by how many samples named it, then by the best score among
  them, then by first appearance. Ungrounded titles (id None) compete as their own entries
  (one per distinct title) and come out as None: invalid slots that keep their rank.
  """
  count: collections.Counter = collections.Counter()
  best: dict[Any, float] = {}
  ids: dict[Any, str | None] = {}
  for answers, score in votes:
    for key in dict.fromkeys((i, None) if i is not None else (None, t) for i, t in answers):
      count[key] += 1
      best[key] = max(best.get(key, -np.inf), score)
      ids.setdefault(key, key[0])
  order = sorted(ids, key=lambda key: (-count[key], -best[key]))  # stable: first appearance
  return [ids[key] for key in order[:k]]


def recommend(model: Any, tokenizer: Any, examples: Sequence[Any], catalog: Any, prompt_cfg: Any,
              *, k: int, mode: str = "beam", batch_size: int = 32, num_samples: int | None = None,
              max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, answer_items: int = 1, exclude_history: bool = False,
              length_penalty: float = 0.0, rng: jax.Array | int = 0,
              trie: cons.ItemTrie | None = None, grounder: Any = None,
              mesh: jax.sharding.Mesh | None = None, progress: bool = False,
              cf_prior: Callable[[Sequence[Any]], np.ndarray] | None = None,
              cf_weight: float = 0.0) -> Recommendations:
  """Ranked top-`k` catalog item ids for each example, best first (see the module docstring).

  Args:
    model, tokenizer: e.g. from `recllm_jax.load_checkpoint(workdir)`.
    examples: `recllm_jax.data.Example`s (only histories and profiles are read), or bare
      histories: sequences of catalog item ids, oldest first (`as_examples`).
    catalog: the items to recommend from, as the model was trained on them: an `ItemCodec`
      (`recllm_jax.data.items.make_codec(config.data.item_format, ...)`), or a `Catalog` for
      titles.
    prompt_cfg: the `PromptConfig` the model was trained with (`config.data.prompt`).
    k: list length. ``beam`` runs k beams; items sharing a title are listed together (catalog
      order), so the list holds k distinct ids whenever the catalog has them.
    mode: ``beam`` | ``cot_constrained`` | ``sample``.
    batch_size: prompts per decoder call, rounded up to a multiple of the mesh's batch devices.
    num_samples: G samples per prompt in the sampling modes (default k).
    max_new_tokens: default: the longest item + EOS for ``beam``, `DEFAULT_SAMPLE_TOKENS` else.
    temperature, top_k, top_p: sampling settings of the sampling modes.
    answer_items: items per constrained answer (``cot_constrained``).
    exclude_history: never recommend an item of the example's history (constrained modes).
      Off by default, as in the published Amazon protocol (re-purchases count).
    length_penalty: beam ranking by score / length**length_penalty.
    rng: PRNG key or seed of the sampling modes.
    trie, grounder: reuse a built `ItemTrie.from_codec(codec, ...)` / `rec.Grounder`.
    mesh: defaults to `sharding.make_mesh()` (all devices on the batch).
    progress: show a tqdm bar over examples.
    cf_prior: ``beam`` only: examples -> [N, num_items] log-probs over the catalog (catalog
      order), e.g. a `recllm_jax.rec.cf_prior.CFPrior`; items sharing a title add their mass.
    cf_weight: weight of the CF log-prior in the beam score (>= 0; 0 = the LLM alone).

  Returns:
    One list per example of at most k ids; only ``sample`` mode yields None (ungrounded answers).
    A `Recommendations` (a list) whose `histories_cut` counts the examples whose history was
    longer than ``prompt_cfg.max_history_tokens``: their prompts keep the newest items (logged).

  Raises:
    ExampleError: an empty history, or a history entry that is no item id of the catalog.
    CatalogMismatchError: a catalog, codec or trie the model was not trained on.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  mode_prompt_config(prompt_cfg, mode)  # validates the mode and the prompt format
  if cf_prior is not None and mode != "beam":
    raise ValueError(f"cf_prior mixes a CF score into beam search: it needs mode='beam', got "
                     f"{mode!r}")
  examples = as_examples(examples)
  check_examples(examples, catalog)
  if not examples:
    return Recommendations()
  check_codec(catalog, tokenizer, model.cfg.vocab_size, trie)
  mesh = mesh or sharding.make_mesh()
  rollout = ItemRollout(catalog, tokenizer, prompt_cfg, mode, vocab_size=model.cfg.vocab_size,
                        grounder=grounder, answer_items=answer_items, trie=trie)
  if max_new_tokens is None:
    max_new_tokens = rollout.default_max_new_tokens(DEFAULT_SAMPLE_TOKENS)
  g = k if mode == "beam" else (num_samples or k)
  key = jax.random.key(rng) if isinstance(rng, int) else rng

  from recllm_jax import progress as progress_bars

  bar = progress_bars.bar(total=len(examples), unit="ex", desc=f"recommend ({mode})",
                          disable=not progress)
  results = Recommendations()
  with jax.set_mesh(mesh):
    for b, rows in enumerate(batch_rows(len(examples), batch_size,
                                        sharding.batch_axis_size(mesh))):
      batch = [examples[i] for i in rows]
      texts, prompts, kept = zip(*(rollout.prompt(ex) for ex in batch))
      padded = collate_prompts(list(enumerate(prompts)), rollout.pad)
      keep = len(set(rows))  # the padded tail repeats the last example
      results.histories_cut += sum(n < len(ex.history) for ex, n in zip(batch[:keep], kept))
      prior = (None if cf_prior is None
               else rollout.trie.leaf_log_prior(cf_prior(batch)))  # [B, L]
      out = rollout.run(model, padded["input_ids"], padded["attention_mask"], num_samples=g,
                        max_new_tokens=max_new_tokens, rng=jax.random.fold_in(key, b),
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        history=rollout.history_rows(batch) if exclude_history else None,
                        prompts=texts, prior=prior, prior_weight=cf_weight,
                        length_penalty=length_penalty)
      for p in range(keep):
        group = range(p * g, (p + 1) * g)
        if mode == "beam":  # beams are distinct items, best first
          results.append([i for r in group for i in out.items[r]][:k])
        else:  # ungrounded answers (None) compete as their own entries, one per answer text
          votes = [(list(zip(out.items[r], out.parsed[r].titles if mode == "sample"
                             else [""] * len(out.items[r]))), float(out.scores[r]))
                   for r in group]
          results.append(rank_by_votes(votes, k))
      bar.update(keep)
  bar.close()
  if results.histories_cut:
    log.info("recommend: %d of %d histories were longer than the prompt budget "
             "(max_history_tokens=%d): their prompts show the newest items only",
             results.histories_cut, len(examples), prompt_cfg.max_history_tokens)
  return results

