"""The one rollout path: prompts -> jitted decoder -> completions -> catalog item ids.

GRPO (`recllm_jax.train.grpo.GrpoTask`) and inference (`recllm_jax.inference.recommend`) both
turn examples into decoded items the same way, so both call :class:`ItemRollout`:

    rollout = ItemRollout(codec, tokenizer, prompt_cfg, mode, vocab_size=model.cfg.vocab_size)
    text, ids, kept = rollout.prompt(example)              # the mode's prompt, encoded
    batch = rollout.run(model, input_ids, attention_mask, num_samples=G, rng=key)
    batch.items[row]                                       # item ids of row b * G + g

Modes (one list, `MODES`):

* ``beam``: constrained beam search over the catalog trie; the G best *distinct* items of a
  prompt, best first (D3, MiniOneRec). Prompts are direct (plus the answer prefix when the chat
  template opens a think block), so the first generated token starts an item.
* ``cot_constrained``: G samples that reason freely, then answer under the catalog trie once they
  write ``<answer>`` + delimiter (needs ``target_format='cot'``).
* ``sample``: G unconstrained samples, parsed and grounded to the catalog by the `Grounder`
  (titles: exact, normalised, fuzzy; SIDs: exact). ``cot`` is the same mode under GRPO's name.

The item format is the codec's (`recllm_jax.data.items`): the trie is built from its texts and
answers are read back through it, so titles and semantic IDs take the same path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from recllm_jax import buckets
from recllm_jax import constraints as cons
from recllm_jax import decoding
from recllm_jax.data.items import ItemCodec, as_codec
from recllm_jax.data.prompts import (ANSWER_CLOSE, ANSWER_OPEN, ParsedCompletion, PromptConfig,
                                     build_prompt_kept, direct_answer_prefix,
                                     parse_completion, prompt_opens_think)
from recllm_jax.data.tokenizer import encode_prompt
from recllm_jax.sharding import host_array

__all__ = ["MODES", "ItemRollout", "RolloutBatch", "collate_prompts", "history_rows",
           "mode_prompt_config", "normalize_mode", "render_prompt"]

MODES = ("beam", "cot_constrained", "sample")
_ALIASES = {"cot": "sample"}  # GRPO's config name for free sampling of (CoT) prompts


def normalize_mode(mode: str) -> str:
  """`mode` under its `MODES` name (``cot`` -> ``sample``); ValueError for an unknown one."""
  mode = _ALIASES.get(mode, mode)
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES} (or {sorted(_ALIASES)})")
  return mode


def mode_prompt_config(prompt_cfg: PromptConfig, mode: str) -> PromptConfig:
  """The `PromptConfig` `mode` renders prompts with: beams are bare items, so ``beam`` uses
  direct prompts; ``cot_constrained`` needs the `cot` format its trigger ("<answer>") lives in."""
  mode = normalize_mode(mode)
  if mode == "beam":
    return dataclasses.replace(prompt_cfg, target_format="direct")
  if mode == "cot_constrained" and prompt_cfg.target_format != "cot":
    raise ValueError("mode='cot_constrained' answers inside <answer></answer>: it needs "
                     f"data.prompt.target_format='cot', got {prompt_cfg.target_format!r}")
  return prompt_cfg


def _render(example: Any, codec: ItemCodec | Any, tokenizer: Any, prompt_cfg: PromptConfig,
            mode: str) -> tuple[str, list[int], int]:
  """`render_prompt`, plus the history items the prompt shows (`build_prompt_kept`)."""
  text, kept = build_prompt_kept(example, codec, tokenizer, mode_prompt_config(prompt_cfg, mode))
  if normalize_mode(mode) == "beam":
    text += direct_answer_prefix(prompt_opens_think(text))
  return text, encode_prompt(tokenizer, text), kept


def render_prompt(example: Any, codec: ItemCodec | Any, tokenizer: Any, prompt_cfg: PromptConfig,
                  mode: str) -> tuple[str, list[int]]:
  """(text, token ids) of one example's prompt in `mode`; ``beam`` prompts end with the direct
  answer prefix so that the first generated token starts an item."""
  return _render(example, codec, tokenizer, prompt_cfg, mode)[:2]


def collate_prompts(rows: Sequence[tuple[int, Sequence[int]]], pad_id: int) -> dict[str, np.ndarray]:
  """(example index, prompt ids) rows -> prompts left-padded to the decoder's prefill bucket.

  Left padding puts every prompt's last token in the same column, where decoding starts; the
  bucket is the one `generate` pads to anyway (`buckets.geometric_bucket`), so few programs.
  """
  length = buckets.geometric_bucket(max(len(ids) for _, ids in rows))
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, (_, prompt) in enumerate(rows):
    ids[r, length - len(prompt):] = prompt
    mask[r, length - len(prompt):] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "example_index": np.asarray([i for i, _ in rows], np.int32)}


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  """G completions per prompt, host numpy; row p * G + g is sample g of prompt p.

  tokens: [N, M] completion tokens (pad after the end). lengths: [N] tokens incl. the EOS (0 for
  a beam that found no item). truncated: [N] the completion hit max_new_tokens without an EOS.
  scores: [N] the ranking score: a beam's (length-penalised) log-prob, the answer's log-prob in
  ``cot_constrained``, the sample's log-prob in ``sample``; -inf for an empty beam.
  ranks: [N] a beam's rank in its group (0 = best); None in the sampling modes.
  texts: the decoded completions (EOS removed). parsed: `parse_completion` of each.
  items: per row, the answered item ids in order (None: an answer that grounds to no item);
  several ids for one answer when items share its text (titles shared by several items).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  truncated: np.ndarray
  scores: np.ndarray | None = None
  ranks: np.ndarray | None = None
  texts: tuple[str, ...] = ()
  parsed: tuple[ParsedCompletion, ...] = ()
  items: tuple[tuple[str | None, ...], ...] = ()


class ItemRollout:
  """Prompts, decoding and reading answers back for one codec, tokenizer, prompt format and mode.

  Args:
    codec: the items (`ItemCodec`, or a `Catalog` for titles).
    tokenizer: the policy's tokenizer.
    prompt_cfg: the `PromptConfig` of training (`config.data.prompt`); the mode adjusts it.
    mode: one of `MODES` (or ``cot``).
    vocab_size: the model's logit columns (the trie's token range).
    grounder: maps answer texts to ids in ``sample`` mode (default `Grounder(codec)`).
    answer_items: items per constrained answer (``cot_constrained``).
    trie: a prebuilt `ItemTrie.from_codec(codec, ...)` to reuse.
  """

  def __init__(self, codec: ItemCodec | Any, tokenizer: Any, prompt_cfg: PromptConfig, mode: str,
               *, vocab_size: int, grounder: Any = None, answer_items: int = 1,
               trie: cons.ItemTrie | None = None) -> None:
    self.codec = as_codec(codec)
    self.catalog = self.codec.catalog
    self.tokenizer = tokenizer
    self.mode = normalize_mode(mode)
    self.base_prompt_cfg = prompt_cfg
    self.prompt_cfg = mode_prompt_config(prompt_cfg, self.mode)
    self.answer_items = answer_items
    self.eos = tokenizer.eos_token_id
    self.pad = self.eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    self.index_of = {item.item_id: i for i, item in enumerate(self.catalog)}
    self.trie = None
    if self.mode != "sample":
      self.trie = trie or cons.ItemTrie.from_codec(self.codec, tokenizer, vocab_size=vocab_size)
      if self.trie.item_ids != tuple(self.index_of):
        raise ValueError("trie does not match catalog: build it with ItemTrie.from_codec(codec)")
    if grounder is None and self.mode == "sample":
      from recllm_jax.rec.grounding import Grounder  # rec imports data; data never imports rec
      grounder = Grounder(self.codec)
    self.grounder = grounder

  # -- prompts ------------------------------------------------------------------------------

  def prompt(self, example: Any) -> tuple[str, list[int], int]:
    """`render_prompt` of one example in this rollout's mode, plus how many history items the
    prompt shows (the newest; fewer than the history when `max_history_tokens` cut it)."""
    return _render(example, self.codec, self.tokenizer, self.base_prompt_cfg, self.mode)

  def default_max_new_tokens(self, sample_tokens: int) -> int:
    """The longest item + EOS for ``beam``, else `sample_tokens`."""
    if self.mode == "beam":
      return max(map(len, self.trie.leaf_sequences)) + 1
    return sample_tokens

  def _encode(self, text: str) -> tuple[int, ...]:
    return tuple(self.tokenizer.encode(text, add_special_tokens=False))

  def constraint(self, num_items: int, history: np.ndarray | None) -> cons.CatalogConstraint:
    """The catalog constraint (trie, end tokens, list length, excluded history rows)."""
    return cons.CatalogConstraint(self.trie, eos_token_id=self.eos, num_items=num_items,
                                  delimiter=self._encode(self.prompt_cfg.item_delimiter),
                                  history=history)

  # -- decoding -----------------------------------------------------------------------------

  def run(self, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *,
          num_samples: int, max_new_tokens: int, rng: jax.Array | None = None,
          greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          history: np.ndarray | None = None, prompts: Sequence[str] | None = None,
          prior: np.ndarray | None = None, prior_weight: float = 0.0,
          length_penalty: float = 0.0) -> RolloutBatch:
    """G = `num_samples` completions per prompt of `input_ids` [B, T] (left-padded), read back.

    history: [B, H] catalog indices never to answer (-1 padded; constrained modes).
    prompts: the B prompt texts (whether a prompt opened a think block decides parsing);
      default: decoded from `input_ids`.
    prior, prior_weight, length_penalty: ``beam`` only (CF-guided decoding, see
      `decoding.beam_search`): prior is [B, L] per trie leaf.
    """
    m, g = max_new_tokens, num_samples
    if self.mode == "beam":
      out = decoding.beam_search(model, input_ids, attention_mask,
                                 constraint=self.constraint(1, history), num_beams=g,
                                 num_return=g, max_new_tokens=m, length_penalty=length_penalty,
                                 eos_token_id=self.eos, pad_token_id=self.pad, prior=prior,
                                 prior_weight=prior_weight)
      # host_array: the outputs may be sharded over every process's devices.
      tokens = host_array(out.tokens).reshape(-1, m)
      scores = host_array(out.scores).reshape(-1)  # [B*G]
      lengths = np.where(np.isfinite(scores), host_array(out.lengths).reshape(-1), 0)
      leaves = np.where(np.isfinite(scores)[:, None], host_array(out.items).reshape(-1, 1), -1)
      ranks = np.tile(np.arange(g), len(input_ids))
    else:
      if prior is not None:
        raise ValueError(f"a CF prior mixes into beam search only, not mode={self.mode!r}")
      kwargs: dict[str, Any] = {}
      if self.mode == "cot_constrained":
        d = self.prompt_cfg.item_delimiter
        kwargs = {"constraint": self.constraint(self.answer_items, history),
                  "constraint_trigger": self._encode(ANSWER_OPEN + d),
                  "constraint_close": self._encode(d + ANSWER_CLOSE)}
      out = decoding.generate(model, input_ids, attention_mask, max_new_tokens=m,
                              rng=jax.random.key(0) if rng is None else rng,
                              temperature=0.0 if greedy else temperature, top_k=top_k,
                              top_p=top_p, eos_token_id=self.eos, pad_token_id=self.pad,
                              num_samples=g, **kwargs)
      tokens, lengths = host_array(out.tokens), host_array(out.lengths)
      logprobs = host_array(out.logprobs)  # [N, M]
      if self.mode == "cot_constrained":
        # Rank by the answer's log-prob: the reasoning text differs between samples.
        scores = np.where(host_array(out.constrained), logprobs, 0.0).sum(-1)
        leaves = host_array(out.items)  # [N, answer_items]
      else:
        scores, leaves = logprobs.sum(-1), None
      ranks = None
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    truncated = (lengths >= m) & (last != self.eos)
    if prompts is None:
      prompts = [self.tokenizer.decode(row[mask.astype(bool)], skip_special_tokens=False)
                 for row, mask in zip(np.asarray(input_ids), np.asarray(attention_mask))]
    texts, parsed = self.read(tokens, lengths, [prompts[r // g] for r in range(len(tokens))])
    if leaves is not None:
      items = tuple(tuple(i for leaf in row if leaf >= 0 for i in self.trie.catalog_ids(int(leaf)))
                    for row in leaves)
    else:
      items = tuple(tuple(self.grounder.ground_one(t)[0] for t in p.titles) for p in parsed)
    return RolloutBatch(tokens=tokens, lengths=lengths.astype(np.int32), truncated=truncated,
                        scores=scores.astype(np.float32), ranks=ranks, texts=tuple(texts),
                        parsed=tuple(parsed), items=items)

  def read(self, tokens: np.ndarray, lengths: np.ndarray, prompts: Sequence[str]
           ) -> tuple[list[str], list[ParsedCompletion]]:
    """Decoded completions (EOS removed) and their parses, row by row: `run`'s text step, also
    for completions written outside it (GRPO's `add_gt` rows)."""
    texts, parsed = [], []
    for row, length, prompt in zip(tokens, lengths, prompts):
      row = row[:length]
      if length and row[-1] == self.eos:
        row = row[:-1]
      text = self.tokenizer.decode(row, skip_special_tokens=False)
      texts.append(text)
      parsed.append(parse_completion(text, self.prompt_cfg, think_open=prompt_opens_think(prompt)))
    return texts, parsed

  def history_rows(self, examples: Sequence[Any]) -> np.ndarray:
    """[B, H] catalog indices of each history (-1 padded), H bucketed (see `history_rows`)."""
    return history_rows(examples, self.index_of)


_MIN_HISTORY_WIDTH = 16  # histories are short next to prompts: start below buckets' 64


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
