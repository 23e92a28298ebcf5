"""Ground generated titles to catalog item ids.

An LLM recommender answers with *titles*; rewards and metrics need item
*ids*. Generated titles are often the catalog title verbatim (constrained
decoding guarantees it), but free sampling also yields near misses: changed
spacing, changed case, a dropped word or a typo. Scoring those as
hallucinations would punish the policy for cosmetic slips, while accepting
anything would reward made-up items, so matching runs in three documented
stages, stopping at the first that succeeds:

1. ``"exact"``: the title equals a catalog title character for character.
2. ``"normalized"``: equal after :func:`~recllm_jax.data.catalog.normalize_title`
   (whitespace runs collapsed, ends stripped), i.e. ``Catalog.ground_title``.
3. ``"fuzzy"``: ``difflib.SequenceMatcher`` ratio >= ``fuzzy_cutoff`` between
   the case-folded normalised title and a case-folded normalised catalog
   title. The best ratio wins (ties: the earlier title in catalog order).

Several items may share a title (Amazon Office_Products has 3,443 titles for
3,459 items); every stage resolves such a title to its most popular id
(ties: catalog order), the rule of ``Catalog.ground_title``.

Fuzzy matching compares against a short candidate list, not the catalog:
an inverted index maps each word token to the titles containing it, and the
query's *rarest* tokens pick the candidates (a title similar enough to pass
a 0.9 cutoff shares most of its words, and rare words are the ones that
single it out). This keeps a lookup at a few hundred operations on 100k-item
catalogs. It is a heuristic: a near miss whose every surviving word is very
common (more postings than ``max_postings``) can be missed and then counts
as unknown, which errs on the side of not rewarding an unclear answer.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence

from recllm_jax.data.catalog import Catalog, normalize_title
from recllm_jax.data.items import ItemCodec, as_codec

__all__ = [
  "MATCH_EXACT",
  "MATCH_FUZZY",
  "MATCH_KINDS",
  "MATCH_NORMALIZED",
  "GroundedAnswer",
  "Grounder",
  "fuzzy_key",
  "title_tokens",
]

MATCH_EXACT = "exact"
MATCH_NORMALIZED = "normalized"
MATCH_FUZZY = "fuzzy"
MATCH_KINDS = (MATCH_EXACT, MATCH_NORMALIZED, MATCH_FUZZY)

_TOKEN_RE = re.compile(r"\w+")


def fuzzy_key(title: str) -> str:
  """The form fuzzy matching compares: normalised whitespace, case-folded.

  Case is folded only here (not in the ``normalized`` stage) because case
  can distinguish real products, so a case-only difference should be an
  approximate match, never an equal one.
  """
  return normalize_title(title).casefold()


def title_tokens(title: str) -> frozenset[str]:
  """Case-folded word tokens (``\\w+``) of a title; punctuation separates words."""
  return frozenset(_TOKEN_RE.findall(title.casefold()))


@dataclasses.dataclass(frozen=True)
class GroundedAnswer:
  """Per-title grounding results, aligned with ``titles``.

  ``item_ids[i]`` is ``None`` and ``matches[i]`` is ``None`` when title ``i``
  matched nothing (a hallucinated item).
  """

  titles: tuple[str, ...]
  item_ids: tuple[str | None, ...]
  matches: tuple[str | None, ...]

  def __len__(self) -> int:
    return len(self.titles)

  @property
  def num_grounded(self) -> int:
    return sum(i is not None for i in self.item_ids)


def _most_popular(ids: Sequence[str], popularity: Mapping[str, int] | None) -> str:
  if popularity is None or len(ids) == 1:
    return ids[0]
  # max() keeps the first maximal element, i.e. catalog order on ties.
  return max(ids, key=lambda i: popularity.get(i, 0))


class Grounder:
  """Maps titles to item ids for one catalog; build once, query many times.

  Args:
    catalog: the items to ground to: a `Catalog` (titles) or an `ItemCodec` (its item texts;
      a SID codec grounds exact and whitespace-normalised SIDs only, never fuzzy).
    popularity: item id -> interaction count (e.g. ``data.popularity`` of the
      *training* examples); decides which id a shared title grounds to.
    fuzzy_cutoff: minimum ``SequenceMatcher`` ratio for a fuzzy match, in
      ``(0, 1]``; ``None`` disables the fuzzy stage.
    max_candidates: fuzzy candidates scored per title (those sharing the
      most rare tokens).
    max_postings: postings read per title in the fuzzy prefilter (rarest
      tokens first; the rarest token is always read).
    cache_size: distinct titles whose result is memoised (generated titles
      repeat heavily across a GRPO group); the cache is cleared when full.
  """

  def __init__(
    self,
    catalog: Catalog | ItemCodec,
    popularity: Mapping[str, int] | None = None,
    *,
    fuzzy_cutoff: float | None = 0.9,
    max_candidates: int = 64,
    max_postings: int = 20_000,
    cache_size: int = 100_000,
  ) -> None:
    if fuzzy_cutoff is not None and not 0.0 < fuzzy_cutoff <= 1.0:
      raise ValueError(f"fuzzy_cutoff must be in (0, 1] or None, got {fuzzy_cutoff}")
    if max_candidates < 1 or max_postings < 1:
      raise ValueError(f"max_candidates and max_postings must be >= 1, got {max_candidates}, {max_postings}")
    self.codec = as_codec(catalog)
    catalog = self.catalog = self.codec.catalog
    self.popularity = popularity
    # A SID is either exact or another item: similarity between SID strings means nothing.
    self.fuzzy_cutoff = fuzzy_cutoff if self.codec.fuzzy else None
    self.max_candidates = max_candidates
    self.max_postings = max_postings
    self.cache_size = cache_size
    self._cache: dict[str, tuple[str | None, str | None]] = {}

    exact: dict[str, list[str]] = {}
    by_key: dict[str, list[str]] = {}
    for item in catalog:
      text = self.codec.text(item.item_id)
      exact.setdefault(text, []).append(item.item_id)
      if self.fuzzy_cutoff is not None:
        by_key.setdefault(fuzzy_key(text), []).append(item.item_id)
    self._exact = {t: _most_popular(ids, popularity) for t, ids in exact.items()}
    # Fuzzy keys in catalog order (dict order), so index order breaks ratio ties.
    self._keys: list[str] = list(by_key)
    self._key_ids: list[str] = [_most_popular(ids, popularity) for ids in by_key.values()]
    postings: dict[str, list[int]] = collections.defaultdict(list)
    for k, key in enumerate(self._keys):
      for token in title_tokens(key):
        postings[token].append(k)
    self._postings = dict(postings)

  def __repr__(self) -> str:
    return f"Grounder({self.catalog!r}, fuzzy_cutoff={self.fuzzy_cutoff})"

  def ground(self, titles: Iterable[str]) -> GroundedAnswer:
    """Ground each title; see the module docstring for the matching stages."""
    titles = tuple(titles)
    results = [self.ground_one(t) for t in titles]
    return GroundedAnswer(
      titles=titles,
      item_ids=tuple(r[0] for r in results),
      matches=tuple(r[1] for r in results),
    )

  def ground_one(self, title: str) -> tuple[str | None, str | None]:
    """``(item_id, match kind)`` for one title, ``(None, None)`` if nothing matches."""
    hit = self._cache.get(title)
    if hit is None:
      hit = self._match(title)
      if len(self._cache) >= self.cache_size:
        self._cache.clear()
      self._cache[title] = hit
    return hit

  def _match(self, title: str) -> tuple[str | None, str | None]:
    item_id = self._exact.get(title)
    if item_id is not None:
      return item_id, MATCH_EXACT
    ids = self.codec.ids_for_text(title)
    if ids:
      return _most_popular(ids, self.popularity), MATCH_NORMALIZED
    if self.fuzzy_cutoff is not None:
      k = self._fuzzy(fuzzy_key(title))
      if k is not None:
        return self._key_ids[k], MATCH_FUZZY
    return None, None

  def _candidates(self, key: str) -> list[int]:
    """Indices of catalog keys sharing the most rare tokens with ``key``, best first."""
    lists = sorted((self._postings[t] for t in title_tokens(key) if t in self._postings), key=len)
    shared: collections.Counter[int] = collections.Counter()
    read = 0
    for postings in lists:
      if read and read + len(postings) > self.max_postings:
        break
      shared.update(postings)
      read += len(postings)
    # Length bound from SequenceMatcher: ratio <= 2*min(a, b) / (a + b).
    cutoff = self.fuzzy_cutoff or 1.0
    lo, hi = len(key) * cutoff / (2 - cutoff), len(key) * (2 - cutoff) / cutoff
    ranked = sorted(
      (k for k in shared if lo <= len(self._keys[k]) <= hi),
      key=lambda k: (-shared[k], k),
    )
    return ranked[: self.max_candidates]

  def _fuzzy(self, key: str) -> int | None:
    if not key:
      return None
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(key)  # seq2 is the one SequenceMatcher caches analysis for
    best, best_ratio = None, self.fuzzy_cutoff or 1.0
    for k in self._candidates(key):
      matcher.set_seq1(self._keys[k])
      # Cheap upper bounds first, as difflib.get_close_matches does.
      if matcher.real_quick_ratio() < best_ratio or matcher.quick_ratio() < best_ratio:
        continue
      ratio = matcher.ratio()
      if ratio > best_ratio or (ratio == best_ratio and (best is None or k < best)):
        best, best_ratio = k, ratio
    return best
