"""Top-K recommendation from a trained LLM: the one inference path evaluation, the demo and users share.

`recommend(model, tokenizer, examples, catalog, prompt_cfg, k=...)` turns examples into ranked
catalog item ids, best first, so that `recllm_jax.rec.metrics.evaluate_rankings` can score the
LLM exactly like the baselines. Everything a caller used to rebuild by hand lives here once:
prompts (the training templates), the catalog trie (`ItemTrie.from_catalog`, so trie leaves map
back to item ids in catalog order, duplicate titles included), batching on the mesh and the
mapping from decoded leaves or titles back to ids.

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

Compiled shapes stay few: every batch has the same number of rows (the last one is padded by
repeating its last example; a multiple of the mesh's batch devices), prompts are left-padded to
a geometric length bucket, and the history width of ``exclude_history`` is bucketed too.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from recllm_jax import buckets
from recllm_jax import constraints as cons
from recllm_jax import decoding
from recllm_jax import sharding

__all__ = ["MODES", "DEFAULT_SAMPLE_TOKENS", "batch_rows", "history_rows", "mode_prompt_config",
           "prompt_ids", "rank_by_votes", "recommend"]

MODES = ("beam", "cot_constrained", "sample")
DEFAULT_SAMPLE_TOKENS = 256  # max_new_tokens of the sampling modes when not given
# Narrowest history bucket: histories are short next to prompts, so start below buckets' 64.
_MIN_HISTORY_WIDTH = 16


def mode_prompt_config(prompt_cfg: Any, mode: str) -> Any:
  """The `PromptConfig` `mode` renders prompts with: beams are bare titles, so ``beam`` uses
  direct prompts; ``cot_constrained`` needs the `cot` format its trigger ("<answer>") lives in."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if mode == "beam":
    return dataclasses.replace(prompt_cfg, target_format="direct")
  if mode == "cot_constrained" and prompt_cfg.target_format != "cot":
    raise ValueError("mode='cot_constrained' answers inside <answer></answer>: it needs "
                     f"data.prompt.target_format='cot', got {prompt_cfg.target_format!r}")
  return prompt_cfg


def prompt_ids(example: Any, catalog: Any, tokenizer: Any, prompt_cfg: Any,
               mode: str) -> tuple[str, list[int]]:
  """(text, token ids) of one example's prompt in `mode`; ``beam`` prompts end with the direct
  answer prefix so that the first generated token starts a title."""
  from recllm_jax.data.prompts import build_prompt, direct_answer_prefix, prompt_opens_think
  from recllm_jax.data.tokenizer import encode_prompt

  cfg = mode_prompt_config(prompt_cfg, mode)
  text = build_prompt(example, catalog, tokenizer, cfg)
  if mode == "beam":
    text += direct_answer_prefix(prompt_opens_think(text))
  return text, encode_prompt(tokenizer, text)


def batch_rows(count: int, batch_size: int, multiple: int) -> Iterator[list[int]]:
  """Example indices in batches of one fixed size (a multiple of `multiple`, at most
  `batch_size` rounded up, no larger than `count` needs); the last batch repeats its last index."""
  size = buckets.round_up(max(1, min(batch_size, count)), multiple)
  for start in range(0, count, size):
    rows = list(range(start, min(start + size, count)))
    yield rows + [rows[-1]] * (size - len(rows))


def history_rows(examples: Sequence[Any], index_of: Mapping[str, int]) -> np.ndarray:
  """[B, H] catalog indices of each history (-1 padded); H is bucketed (powers of two from 16)
  so that varying history lengths share one compiled decoder."""
  longest = max((len(ex.history) for ex in examples), default=0)
  width = buckets.geometric_bucket(max(longest, 1), minimum=_MIN_HISTORY_WIDTH)
  rows = np.full((len(examples), width), -1, np.int32)
  for r, ex in enumerate(examples):
    known = [index_of[i] for i in ex.history if i in index_of]
    rows[r, :len(known)] = known
  return rows


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


def _collate(prompts: Sequence[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
  from recllm_jax.train.grpo import collate_prompts  # the training rollouts' left padding

  batch = collate_prompts(list(enumerate(prompts)), pad)
  return batch["input_ids"], batch["attention_mask"]


def recommend(model: Any, tokenizer: Any, examples: Sequence[Any], catalog: Any, prompt_cfg: Any,
              *, k: int, mode: str = "beam", batch_size: int = 32, num_samples: int | None = None,
              max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, answer_items: int = 1, exclude_history: bool = False,
              length_penalty: float = 0.0, rng: jax.Array | int = 0,
              trie: cons.ItemTrie | None = None, grounder: Any = None,
              mesh: jax.sharding.Mesh | None = None, progress: bool = False,
              cf_prior: Callable[[Sequence[Any]], np.ndarray] | None = None,
              cf_weight: float = 0.0) -> list[list[str | None]]:
  """Ranked top-`k` catalog item ids for each example, best first (see the module docstring).

  Args:
    model, tokenizer: e.g. from `recllm_jax.load_checkpoint(workdir)`.
    examples: `recllm_jax.data.Example`s (only histories and profiles are read).
    catalog: the `recllm_jax.data.Catalog` to recommend from (the model's training catalog).
    prompt_cfg: the `PromptConfig` the model was trained with (`config.data.prompt`).
    k: list length. ``beam`` runs k beams; items sharing a title are listed together (catalog
      order), so the list holds k distinct ids whenever the catalog has them.
    mode: ``beam`` | ``cot_constrained`` | ``sample``.
    batch_size: prompts per decoder call, rounded up to a multiple of the mesh's batch devices.
    num_samples: G samples per prompt in the sampling modes (default k).
    max_new_tokens: default: the longest title + EOS for ``beam``, `DEFAULT_SAMPLE_TOKENS` else.
    temperature, top_k, top_p: sampling settings of the sampling modes.
    answer_items: titles per constrained answer (``cot_constrained``).
    exclude_history: never recommend an item of the example's history (constrained modes).
      Off by default, as in the published Amazon protocol (re-purchases count).
    length_penalty: beam ranking by score / length**length_penalty.
    rng: PRNG key or seed of the sampling modes.
    trie, grounder: reuse a built `ItemTrie.from_catalog(catalog, ...)` / `rec.Grounder`.
    mesh: defaults to `sharding.make_mesh()` (all devices on the batch).
    progress: show a tqdm bar over examples.
    cf_prior: ``beam`` only: examples -> [N, num_items] log-probs over the catalog (catalog
      order), e.g. a `recllm_jax.rec.cf_prior.CFPrior`; items sharing a title add their mass.
    cf_weight: weight of the CF log-prior in the beam score (>= 0; 0 = the LLM alone).

  Returns:
    One list per example of at most k ids; only ``sample`` mode yields None (ungrounded titles).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  mode_prompt_config(prompt_cfg, mode)  # validates the mode and the prompt format
  if cf_prior is not None and mode != "beam":
    raise ValueError(f"cf_prior mixes a CF score into beam search: it needs mode='beam', got "
                     f"{mode!r}")
  if not examples:
    return []
  from recllm_jax.data.items import as_codec
  codec = as_codec(catalog)
  catalog = codec.catalog
  mesh = mesh or sharding.make_mesh()
  constrained = mode != "sample"
  if constrained and trie is None:
    trie = cons.ItemTrie.from_codec(codec, tokenizer, vocab_size=model.cfg.vocab_size)
  if constrained and trie.item_ids != tuple(item.item_id for item in catalog):
    raise ValueError("trie does not match catalog: build it with ItemTrie.from_catalog(catalog)")
  if mode == "sample" and grounder is None:
    from recllm_jax.rec import Grounder
    grounder = Grounder(codec)
  if max_new_tokens is None:
    max_new_tokens = (max(map(len, trie.leaf_sequences)) + 1 if mode == "beam"
                      else DEFAULT_SAMPLE_TOKENS)
  g = num_samples or k
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  eos = tokenizer.eos_token_id
  pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
  index_of = {item.item_id: i for i, item in enumerate(catalog)}
  enc = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False))
  delimiter = enc(prompt_cfg.item_delimiter)

  from tqdm.auto import tqdm

  bar = tqdm(total=len(examples), unit="ex", desc=f"recommend ({mode})", disable=not progress)
  results: list[list[str | None]] = []
  with jax.set_mesh(mesh):
    for b, rows in enumerate(batch_rows(len(examples), batch_size,
                                        sharding.batch_axis_size(mesh))):
      batch = [examples[i] for i in rows]
      texts, prompts = zip(*(prompt_ids(ex, codec, tokenizer, prompt_cfg, mode) for ex in batch))
      ids, mask = _collate(prompts, pad)
      history = history_rows(batch, index_of) if exclude_history else None
      keep = len(set(rows))  # the padded tail repeats the last example
      if mode == "beam":
        constraint = cons.CatalogConstraint(trie, eos_token_id=eos, num_items=1, history=history)
        prior = None if cf_prior is None else trie.leaf_log_prior(cf_prior(batch))  # [B, L]
        out = decoding.beam_search(model, ids, mask, constraint=constraint, num_beams=k,
                                   num_return=k, max_new_tokens=max_new_tokens,
                                   length_penalty=length_penalty, eos_token_id=eos,
                                   pad_token_id=pad, prior=prior, prior_weight=cf_weight)
        leaves = np.asarray(out.items)[:keep]  # [B, k]
        valid = np.isfinite(np.asarray(out.scores))[:keep]  # [B, k]
        for row_leaves, row_valid in zip(leaves, valid):
          ranked = [i for leaf, ok in zip(row_leaves, row_valid) if ok and leaf >= 0
                    for i in trie.catalog_ids(int(leaf))]
          results.append(ranked[:k])
      else:
        kwargs: dict[str, Any] = {}
        if mode == "cot_constrained":
          from recllm_jax.data.prompts import ANSWER_CLOSE, ANSWER_OPEN
          d = prompt_cfg.item_delimiter
          kwargs = {"constraint": cons.CatalogConstraint(
              trie, eos_token_id=eos, num_items=answer_items, delimiter=delimiter,
              history=history),
              "constraint_trigger": enc(ANSWER_OPEN + d), "constraint_close": enc(d + ANSWER_CLOSE)}
        out = decoding.generate(model, ids, mask, max_new_tokens=max_new_tokens,
                                rng=jax.random.fold_in(key, b), temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_token_id=eos, pad_token_id=pad,
                                num_samples=g, **kwargs)
        logprobs = np.asarray(out.logprobs)  # [B*G, M]
        if mode == "cot_constrained":
          # Rank ties by the answer's log-prob: the reasoning text differs between samples.
          scores = np.where(np.asarray(out.constrained), logprobs, 0.0).sum(-1)  # [B*G]
          answers = [[(i, codec.text(i)) for leaf in row if leaf >= 0
                      for i in trie.catalog_ids(int(leaf))] for row in np.asarray(out.items)]
        else:
          scores = logprobs.sum(-1)  # [B*G]
          answers = _grounded_answers(np.asarray(out.tokens), np.asarray(out.lengths), texts,
                                      g, tokenizer, prompt_cfg, grounder)
        for p in range(keep):
          votes = [(answers[p * g + s], float(scores[p * g + s])) for s in range(g)]
          results.append(rank_by_votes(votes, k))
      bar.update(keep)
  bar.close()
  return results


def _grounded_answers(tokens: np.ndarray, lengths: np.ndarray, prompts: Sequence[str], g: int,
                      tokenizer: Any, prompt_cfg: Any, grounder: Any
                      ) -> list[list[tuple[str | None, str]]]:
  """Per sample row: its parsed titles grounded to ids (an unparsable completion answers none)."""
  from recllm_jax.data.prompts import parse_completion, prompt_opens_think

  out = []
  for row, (seq, length) in enumerate(zip(tokens, lengths)):
    text = tokenizer.decode(seq[:length], skip_special_tokens=False)
    parsed = parse_completion(text, prompt_cfg, think_open=prompt_opens_think(prompts[row // g]))
    out.append([(grounder.ground_one(t)[0], t) for t in parsed.titles])
  return out
