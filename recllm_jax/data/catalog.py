"""Item catalog: ids, titles, attributes, and title -> id grounding.

LLM recommenders generate *titles*, while metrics and rewards are defined on
item *ids*. Titles are not unique in real catalogs (Amazon Office_Products has
3,443 distinct titles for 3,459 items), so the catalog offers both "all ids
with this title" and a deterministic "ground to one id" rule.

This module is the bottom of ``recllm_jax.data``: it imports nothing from the
package, so :mod:`~recllm_jax.data.schema` (which holds a :class:`Catalog` in
every dataset) can import it without a cycle.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["Catalog", "Item", "ItemSequence", "normalize_title", "popularity"]


class ItemSequence(Protocol):
  """What :func:`popularity` reads: item ids seen (``history``) and next (``targets``).

  :class:`recllm_jax.data.schema.Example` satisfies it; a protocol keeps
  this module free of imports from the rest of the package.
  """

  @property
  def history(self) -> Sequence[str]: ...

  @property
  def targets(self) -> Sequence[str]: ...


def normalize_title(title: str) -> str:
  """Collapse runs of whitespace and strip the ends.

  Generated titles routinely differ from catalog titles only in spacing
  (e.g. the double space in "EXPO 86074  Low-Odor ..."), and tokenizers do
  not always round-trip whitespace, so lookups compare normalised forms.
  Case and punctuation are kept: they distinguish real products.
  """
  return " ".join(title.split())


@dataclasses.dataclass(frozen=True)
class Item:
  """One catalog entry.

  ``attributes`` holds everything besides id and title (brand, category,
  price, description, ...); prompts pick from it by name.
  """

  item_id: str
  title: str
  attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


class Catalog:
  """An insertion-ordered collection of :class:`Item` keyed by id.

  Order matters: it is the tie-breaker for grounding and the order of
  :meth:`titles`, which constrained decoders turn into a trie, so keeping
  it stable keeps runs reproducible.
  """

  def __init__(self, items: Iterable[Item] | Mapping[str, Item] = ()) -> None:
    values = items.values() if isinstance(items, Mapping) else items
    self.items: dict[str, Item] = {}
    self._by_title: dict[str, list[str]] = {}
    for item in values:
      self.add(item)

  def add(self, item: Item) -> None:
    """Append ``item``; duplicate ids are rejected to keep ids primary keys."""
    if item.item_id in self.items:
      raise ValueError(f"duplicate item id {item.item_id!r}")
    self.items[item.item_id] = item
    self._by_title.setdefault(normalize_title(item.title), []).append(item.item_id)

  def __len__(self) -> int:
    return len(self.items)

  def __contains__(self, item_id: object) -> bool:
    return item_id in self.items

  def __getitem__(self, item_id: str) -> Item:
    return self.items[item_id]

  def __iter__(self) -> Iterator[Item]:
    return iter(self.items.values())

  def __repr__(self) -> str:
    return f"Catalog({len(self)} items, {len(self._by_title)} unique titles)"

  def title(self, item_id: str) -> str:
    return self.items[item_id].title

  def ids_for_title(self, title: str) -> list[str]:
    """Every id whose title equals ``title`` after whitespace normalisation, catalog order."""
    return list(self._by_title.get(normalize_title(title), ()))

  def ground_title(self, title: str, popularity: Mapping[str, int] | None = None) -> str | None:
    """Map a (generated) title to a single item id.

    Picks the most popular id carrying the title (ties, or no popularity
    given: the first in catalog order), so duplicate titles resolve to the
    item a user most likely meant. Returns ``None`` for non-catalog titles
    (hallucinations), which callers should score as misses.
    """
    ids = self._by_title.get(normalize_title(title))
    if not ids:
      return None
    if popularity is None or len(ids) == 1:
      return ids[0]
    # max() returns the first maximal element, i.e. catalog order on ties.
    return max(ids, key=lambda i: popularity.get(i, 0))

  def titles(self) -> list[str]:
    """Unique titles (as stored, first occurrence wins) in catalog order."""
    return [self.items[ids[0]].title for ids in self._by_title.values()]


def popularity(examples: Iterable[ItemSequence]) -> collections.Counter[str]:
  """Count item-id occurrences over histories and targets.

  Pass *training* examples only: counting evaluation targets would leak
  them into grounding/popularity baselines. Because training examples are
  often prefixes of one another, absolute counts are inflated but the
  ranking is what grounding needs.
  """
  counts: collections.Counter[str] = collections.Counter()
  for ex in examples:
    counts.update(ex.history)
    counts.update(ex.targets)
  return counts
