"""Item codecs: how an item is written in prompts and answers, and how an answer reads back.

An LLM recommender names items in text. What that text is decides what the model must learn:

* ``title`` (:class:`TitleCodec`): the item's title, the RecLLM-R1 paper's format and what a
  pretrained 1.5B model reads best. Titles are long (tens of tokens) and not unique.
* ``sid`` (:class:`SidCodec`): a semantic ID, 3-4 position-specific code tokens such as
  ``<a_60><b_159><c_203>`` (TIGER, MiniOneRec). Every code is one added token, so an item is
  3-4 tokens, every item has its own SID and items with similar codes are similar items: a
  small model learns them from a few thousand sessions where it cannot learn to spell titles.

A codec is the one place that knows this. Prompts write ``codec.text(item_id)``, the
constrained decoder's trie is built from the same texts (``ItemTrie.from_codec``), parsing maps
answer texts back with ``codec.ids_for_text``, and the tokenizer gets ``codec.new_tokens()``.
A new item format is a new codec plus its tests.

SIDs come, in this order, from a SID file named by the run (``data.sid_file``), from
``<data dir>/sids.tsv`` (both written by ``scripts/build_sids.py``), or from the items' own
``sid`` attribute (Amazon's ``info.txt``, a ``sid`` field in JSONL or
Parquet catalogs). Items that share a SID get one more code level, so every SID is unique and
none is a prefix of another (:func:`recllm_jax.data.sids.resolve_collisions`).

This module imports only the catalog and the SID helpers, so prompts and readers can use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from recllm_jax.data.catalog import Catalog
from recllm_jax.data.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["ITEM_FORMATS", "ItemCodec", "SidCodec", "TitleCodec", "as_codec", "make_codec"]

ITEM_FORMATS = ("title", "sid")
SID_ATTRIBUTE = "sid"  # where readers put a dataset's own SIDs (Item.attributes)


class ItemCodec:
  """The item format of a run (see the module docstring); subclasses set the class fields.

  Attributes:
    format: the ``data.item_format`` name.
    noun: what prompts call the item text ("title", "semantic ID").
    fuzzy: whether near-miss answers may be grounded by similarity (titles only: a SID is
      either exact or a different item).
    catalog: the items, in catalog order.
  """

  format: str = ""
  noun: str = ""
  fuzzy: bool = False

  def __init__(self, catalog: Catalog) -> None:
    self.catalog = catalog

  def text(self, item_id: str) -> str:
    """The item as the model reads and writes it."""
    raise NotImplementedError

  def texts(self) -> list[str]:
    """`text` of every item, catalog order (what the decoding trie is built from)."""
    return [self.text(item.item_id) for item in self.catalog]

  def ids_for_text(self, text: str) -> list[str]:
    """Every item id whose text is ``text`` (normalised), catalog order; [] if none."""
    raise NotImplementedError

  def new_tokens(self) -> tuple[str, ...]:
    """Tokens the tokenizer must have as single added tokens (none for titles)."""
    return ()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.catalog!r})"


class TitleCodec(ItemCodec):
  """Items are their titles; a title shared by several items names all of them."""

  format = "title"
  noun = "title"
  fuzzy = True

  def text(self, item_id: str) -> str:
    return self.catalog.title(item_id)

  def ids_for_text(self, text: str) -> list[str]:
    return self.catalog.ids_for_title(text)


class SidCodec(ItemCodec):
  """Items are semantic IDs, one per item (``sids``: item id -> SID string, every item)."""

  format = "sid"
  noun = "semantic ID"

  def __init__(self, catalog: Catalog, sids: dict[str, str]) -> None:
    from recllm_jax.data import sids as sid_lib

    super().__init__(catalog)
    missing = [item.item_id for item in catalog if item.item_id not in sids]
    if missing:
      raise DataError(f"{len(missing)} of {len(catalog)} items have no semantic ID (first: "
                      f"{missing[0]!r}); build them with scripts/build_sids.py --data_dir DIR",
                      item_id=missing[0])
    for item_id, sid in sids.items():
      try:
        sid_lib.parse_sid(sid)
      except ValueError as e:
        raise DataError(f"item {item_id!r}: {e}", item_id=item_id) from e
    ordered = {item.item_id: sids[item.item_id] for item in catalog}
    unique = sid_lib.resolve_collisions(ordered)
    changed = sum(unique[i] != ordered[i] for i in ordered)
    if changed:
      log.warning("%d items shared a semantic ID with another item: each got one more code "
                  "level so that every SID names one item", changed)
    self.sids = unique
    self._by_sid = {self._key(sid): item_id for item_id, sid in unique.items()}
    self._tokens = sid_lib.sid_tokens(unique.values())

  @staticmethod
  def _key(text: str) -> str:
    return "".join(text.split())

  def text(self, item_id: str) -> str:
    return self.sids[item_id]

  def ids_for_text(self, text: str) -> list[str]:
    item_id = self._by_sid.get(self._key(text))
    return [] if item_id is None else [item_id]

  def new_tokens(self) -> tuple[str, ...]:
    return self._tokens


def as_codec(items: Catalog | ItemCodec) -> ItemCodec:
  """``items`` itself, or a :class:`TitleCodec` for a plain catalog (titles are the default)."""
  return items if isinstance(items, ItemCodec) else TitleCodec(items)


def _dataset_sids(catalog: Catalog, data_dir: str | os.PathLike[str] | None,
                  sid_file: str | os.PathLike[str] | None = None) -> tuple[dict[str, str], str]:
  """(item id -> SID, where they came from): `sid_file`, else sids.tsv beside the data, else
  the items' own."""
  from recllm_jax.data import sids as sid_lib

  if sid_file and not Path(sid_file).is_file():
    raise DataError(f"data.sid_file={str(sid_file)!r} does not exist; build it with: python "
                    f"scripts/build_sids.py --data_dir {data_dir or 'DATA_DIR'} --out {sid_file}")
  path = Path(sid_file) if sid_file else None
  if path is None and data_dir is not None:
    path = Path(data_dir) / sid_lib.SID_FILE
  if path is not None:
    if path.is_file():
      sids = sid_lib.read_sid_file(path)
      unknown = [i for i in sids if i not in catalog]
      if unknown:
        raise DataError(f"item id {unknown[0]!r} is not in the catalog ({len(unknown)} such "
                        "ids): the SIDs were built for other data; rebuild them",
                        path=path, item_id=unknown[0])
      return sids, str(path)
  own = {item.item_id: str(item.attributes[SID_ATTRIBUTE]) for item in catalog
         if item.attributes.get(SID_ATTRIBUTE)}
  if not own:
    where = f" and {Path(data_dir) / sid_lib.SID_FILE} does not exist" if data_dir else ""
    raise DataError(f"data.item_format='sid' but the items have no '{SID_ATTRIBUTE}' "
                    f"attribute{where}; build SIDs with: python scripts/build_sids.py "
                    f"--data_dir {data_dir or 'DATA_DIR'}")
  return own, f"the items' '{SID_ATTRIBUTE}' attribute"


def make_codec(item_format: str, catalog: Catalog,
               data_dir: str | os.PathLike[str] | None = None,
               sid_file: str | os.PathLike[str] | None = None) -> ItemCodec:
  """The codec of ``data.item_format`` for ``catalog`` (``data_dir``: where sids.tsv may be;
  ``sid_file``: the SID file to use instead, ``data.sid_file``)."""
  if item_format == "title":
    return TitleCodec(catalog)
  if item_format == "sid":
    sids, source = _dataset_sids(catalog, data_dir, sid_file)
    codec = SidCodec(catalog, sids)
    log.info("semantic IDs of %d items from %s (%d code tokens)", len(catalog), source,
             len(codec.new_tokens()))
    return codec
  raise ValueError(f"data.item_format={item_format!r}; expected one of {ITEM_FORMATS}")

