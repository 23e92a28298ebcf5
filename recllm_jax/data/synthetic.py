"""Deterministic synthetic office-supplies dataset (the offline default).

The data is designed to be *learnable beyond popularity*, so a working
training loop shows up as better-than-baseline metrics:

* item-level sequential structure: every item has a "natural next" item in a
  complementary category, usually from the same brand (a printer is followed
  by its ink, ink by paper, a stapler by staples ...);
* category transitions: otherwise the next category is often a complement of
  the current one;
* user preferences: favourite brands and occupation-driven favourite
  categories (the occupation is visible in the profile for some users).

Only the standard library ``random.Random`` is used, whose sequences are
stable across Python versions and platforms, so the same seed gives
byte-identical files everywhere.

Generated data is usually cached in a directory (``<workdir>/data``) and
reused across runs, so the generator records its settings in
``synthetic.json``; with ``reuse=True`` data made with other settings (or
by an older generator) is regenerated instead of silently reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recllm_jax.data.errors import DataError
from recllm_jax.data.schema import CATALOG_FILE, INTERACTIONS_FILE

__all__ = [
  "GENERATOR_VERSION",
  "META_FILE",
  "SYNTHETIC_FILES",
  "TMP_PREFIX",
  "ensure_synthetic",
  "generate_synthetic",
]

log = logging.getLogger(__name__)

META_FILE = "synthetic.json"
SYNTHETIC_FILES = (CATALOG_FILE, INTERACTIONS_FILE, META_FILE)
DERIVED_SID_FILE = "sids.tsv"  # recllm_jax.data.sids.SID_FILE (not imported: no scipy here)
TMP_PREFIX = ".tmp-"
# Part of the fingerprint in META_FILE: bump whenever the same settings would
# produce different files, so cached data from the old generator is replaced.
GENERATOR_VERSION = 1
_GENERATOR = "recllm_jax.data.synthetic"
# Settings that shape the data besides the seed (generate_synthetic's keywords).
_SIZE_SETTINGS = ("num_items", "num_users", "min_length", "max_length", "profile_fraction")


@dataclasses.dataclass(frozen=True)
class _CategorySpec:
  nouns: tuple[str, ...]
  variants: tuple[str, ...]
  packs: tuple[str, ...]
  base_price: float
  complements: tuple[str, ...]  # likely next categories, most likely first


_CATEGORIES: dict[str, _CategorySpec] = {
  "Printers": _CategorySpec(
    ("Inkjet Printer", "Laser Printer", "All-in-One Printer"),
    ("Wireless", "Compact", "Duplex"), ("",), 129.0, ("Ink Cartridges", "Printer Paper")),
  "Ink Cartridges": _CategorySpec(
    ("Ink Cartridge", "Toner Cartridge"),
    ("Black", "Cyan", "Magenta", "Yellow", "Tri-Color"), ("1-Pack", "2-Pack", "4-Pack"),
    24.0, ("Printer Paper", "Labels")),
  "Printer Paper": _CategorySpec(
    ("Copy Paper", "Photo Paper", "Cardstock"),
    ("Letter", "A4", "Legal"), ("100 Sheets", "500 Sheets", "2500 Sheets"),
    12.0, ("File Folders", "Ink Cartridges")),
  "Labels": _CategorySpec(
    ("Address Labels", "Shipping Labels", "File Folder Labels"),
    ("White", "Clear", "Kraft"), ("30 Sheets", "100 Sheets"), 15.0, ("Envelopes", "File Folders")),
  "Envelopes": _CategorySpec(
    ("Security Envelope", "Catalog Envelope", "Padded Mailer"),
    ("White", "Brown Kraft", "Self-Seal"), ("25-Pack", "100-Pack", "500-Pack"),
    11.0, ("Labels", "Packing Tape")),
  "Packing Tape": _CategorySpec(
    ("Packing Tape", "Tape Dispenser"),
    ("Clear", "Brown", "Heavy Duty"), ("1-Roll", "6-Roll"), 9.0, ("Envelopes", "Staplers")),
  "File Folders": _CategorySpec(
    ("File Folder", "Hanging Folder", "Expanding File"),
    ("Manila", "Assorted Colors", "Letter Size"), ("12-Pack", "50-Pack"), 14.0, ("Binders", "Labels")),
  "Binders": _CategorySpec(
    ("Ring Binder", "Presentation Binder"),
    ("1 Inch", "2 Inch", "3 Inch"), ("1-Pack", "4-Pack"), 10.0, ("Sheet Protectors", "File Folders")),
  "Sheet Protectors": _CategorySpec(
    ("Sheet Protector", "Binder Divider"),
    ("Clear", "Heavyweight", "Assorted Colors"), ("25-Pack", "100-Pack"), 8.0, ("Binders", "Staplers")),
  "Pens": _CategorySpec(
    ("Gel Pen", "Ballpoint Pen", "Fineliner"),
    ("Black", "Blue", "Red", "Assorted Colors"), ("4-Pack", "12-Pack", "24-Pack"),
    7.0, ("Notebooks", "Highlighters")),
  "Notebooks": _CategorySpec(
    ("Spiral Notebook", "Composition Book", "Dot Grid Journal"),
    ("College Ruled", "Wide Ruled", "Graph"), ("1-Pack", "3-Pack", "6-Pack"), 6.0, ("Pens", "Sticky Notes")),
  "Highlighters": _CategorySpec(
    ("Highlighter", "Gel Highlighter"),
    ("Yellow", "Pastel", "Assorted Colors"), ("4-Pack", "12-Pack"), 6.0, ("Sticky Notes", "Notebooks")),
  "Sticky Notes": _CategorySpec(
    ("Sticky Notes", "Page Flags"),
    ("Canary Yellow", "Neon", "Pastel"), ("6 Pads", "12 Pads", "24 Pads"), 9.0, ("Pens", "Highlighters")),
  "Staplers": _CategorySpec(
    ("Desktop Stapler", "Heavy Duty Stapler", "Electric Stapler"),
    ("Black", "Silver", "Red"), ("",), 18.0, ("Staples", "Packing Tape")),
  "Staples": _CategorySpec(
    ("Standard Staples", "Heavy Duty Staples"),
    ("1/4 Inch", "3/8 Inch", "1/2 Inch"), ("1000-Count", "5000-Count"), 5.0, ("Binders", "Sheet Protectors")),
}

_BRANDS: dict[str, float] = {  # brand -> price multiplier (brand tier)
  "Acme": 1.0, "Northwind": 1.15, "Papyra": 0.9, "Inkwell": 1.25, "Staplex": 0.95,
  "Clarion": 1.1, "Vantage": 1.35, "Orbit": 0.85, "Summit": 1.2, "Tessera": 1.05,
}
_BRANDS_PER_CATEGORY = 4

_OCCUPATIONS: dict[str, tuple[str, ...]] = {  # occupation -> favourite categories
  "student": ("Pens", "Notebooks", "Highlighters"),
  "teacher": ("Sticky Notes", "Labels", "Pens"),
  "accountant": ("Printer Paper", "File Folders", "Binders"),
  "designer": ("Printers", "Ink Cartridges", "Printer Paper"),
  "office manager": ("Staplers", "Envelopes", "Labels"),
  "small business owner": ("Packing Tape", "Envelopes", "Printers"),
  "lawyer": ("File Folders", "Sheet Protectors", "Staplers"),
}
_AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
_ACTIONS = ("purchase", "add_to_cart", "view")
_ACTION_WEIGHTS = (0.75, 0.15, 0.10)
_EPOCH = 1_600_000_000  # 2020-09-13, an arbitrary fixed start so output is reproducible


@dataclasses.dataclass(frozen=True)
class _Item:
  item_id: str
  title: str
  brand: str
  category: str
  price: float
  description: str
  weight: float  # within-category popularity


@dataclasses.dataclass(frozen=True)
class _SequenceModel:
  """Probabilities of the next-item mechanisms; the rest is a random category."""

  p_successor: float = 0.45
  p_complement: float = 0.30
  p_favourite: float = 0.20
  p_favourite_brand: float = 0.6


def _make_catalog(rng: random.Random, num_items: int) -> list[_Item]:
  names = list(_CATEGORIES)
  makers = {c: rng.sample(list(_BRANDS), _BRANDS_PER_CATEGORY) for c in names}
  items: list[_Item] = []
  seen_titles: set[str] = set()
  for i in range(num_items):
    category = names[i % len(names)]
    spec = _CATEGORIES[category]
    # A few retries keep duplicate titles rare but possible, as in real catalogs.
    for _ in range(4):
      brand = rng.choice(makers[category])
      noun, variant, pack = rng.choice(spec.nouns), rng.choice(spec.variants), rng.choice(spec.packs)
      title = ", ".join(p for p in (f"{brand} {noun}", variant, pack) if p)
      if title not in seen_titles:
        break
    seen_titles.add(title)
    pack_factor = 1.0 + spec.packs.index(pack) * 0.8
    price = round(spec.base_price * _BRANDS[brand] * pack_factor * rng.uniform(0.85, 1.15)) - 0.01
    items.append(
      _Item(
        item_id=f"P{i:05d}",
        title=title,
        brand=brand,
        category=category,
        price=max(price, 0.99),
        description=f"{variant} {noun.lower()} from {brand}." if variant else f"{noun} from {brand}.",
        weight=1.0 / (1 + rng.random() * 9) ** 1.2,
      )
    )
  return items


def _successors(rng: random.Random, items: Sequence[_Item], by_category: dict[str, list[int]]) -> list[int]:
  """Each item's 'natural next' item: first complement category, same brand when possible."""
  out = []
  for item in items:
    for category in _CATEGORIES[item.category].complements:
      candidates = by_category.get(category, [])
      if candidates:
        same_brand = [j for j in candidates if items[j].brand == item.brand]
        out.append(rng.choice(same_brand or candidates))
        break
    else:
      out.append(rng.randrange(len(items)))
  return out


def _pick(
  rng: random.Random,
  items: Sequence[_Item],
  candidates: Sequence[int],
  favourite_brands: Sequence[str],
  seen: set[int],
  p_favourite_brand: float,
) -> int:
  if rng.random() < p_favourite_brand:
    preferred = [j for j in candidates if items[j].brand in favourite_brands]
    candidates = preferred or candidates
  fresh = [j for j in candidates if j not in seen] or list(candidates)
  return rng.choices(fresh, weights=[items[j].weight for j in fresh])[0]


def _user_sequence(
  rng: random.Random,
  items: Sequence[_Item],
  by_category: dict[str, list[int]],
  successor: Sequence[int],
  favourite_categories: Sequence[str],
  favourite_brands: Sequence[str],
  length: int,
  model: _SequenceModel,
) -> list[int]:
  categories = [c for c in _CATEGORIES if by_category.get(c)]
  favourites = [c for c in favourite_categories if by_category.get(c)] or categories
  seen: set[int] = set()
  sequence: list[int] = []
  category = rng.choice(favourites)
  for _ in range(length):
    r = rng.random()
    if sequence and r < model.p_successor and successor[sequence[-1]] not in seen:
      nxt = successor[sequence[-1]]
    else:
      if sequence and r < model.p_successor + model.p_complement:
        options = [c for c in _CATEGORIES[items[sequence[-1]].category].complements if by_category.get(c)]
        category = rng.choice(options or favourites)
      elif not sequence or r < model.p_successor + model.p_complement + model.p_favourite:
        category = rng.choice(favourites)
      else:
        category = rng.choice(categories)
      nxt = _pick(rng, items, by_category[category], favourite_brands, seen, model.p_favourite_brand)
    sequence.append(nxt)
    seen.add(nxt)
  return sequence


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
  """Atomic write, so concurrent generators (several hosts) never expose a partial file."""
  tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
  with tmp.open("w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _read_meta(out: Path) -> dict[str, Any] | None:
  """The fingerprint of the synthetic data in ``out``; ``None`` when there is none to read.

  Raises when ``out`` holds anything the generator did not write (other
  files, or a catalog/interactions table without ``synthetic.json``, i.e.
  a user's own data), so regenerating can never overwrite it.
  """
  if not out.is_dir():
    return None
  names = {p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)}
  # Semantic IDs built for the data (scripts/build_sids.py) live beside it.
  foreign = sorted(names - set(SYNTHETIC_FILES) - {DERIVED_SID_FILE})
  if foreign:
    raise DataError(
      f"directory holds files the synthetic generator did not write ({', '.join(foreign[:3])}); "
      "refusing to generate synthetic data into it",
      path=out,
    )
  meta_path = out / META_FILE
  if META_FILE not in names:
    if names:
      raise DataError(
        f"directory has {' and '.join(sorted(names))} but no {META_FILE}, so it was not written by "
        "the synthetic generator (or generation was interrupted); refusing to overwrite it. "
        "Use format 'jsonl' to read it, or delete the directory to regenerate",
        path=out,
      )
    return None
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    meta = None
  # Unreadable ({}): stale, so regenerated; the directory holds only the generator's files.
  return meta if isinstance(meta, dict) else {}


def _stale_reason(out: Path, existing: dict[str, Any], meta: dict[str, Any]) -> str | None:
  """Why the data in ``out`` (fingerprint ``existing``) is not the data ``meta`` describes, or ``None``.

  ``synthetic.json`` is written last, so a matching one also means the
  other files are complete (unless someone deleted them since).
  """
  if not existing:
    return f"unreadable {META_FILE}"
  changed = [
    f"{k} {existing.get(k)!r} -> {meta.get(k)!r}"
    for k in sorted(meta.keys() | existing.keys())
    if existing.get(k) != meta.get(k)
  ]
  if changed:
    return ", ".join(changed)
  missing = [name for name in SYNTHETIC_FILES if not (out / name).is_file()]
  return f"missing {', '.join(missing)}" if missing else None


def generate_synthetic(
  out_dir: str | os.PathLike[str],
  *,
  num_items: int = 500,
  num_users: int = 400,
  seed: int = 0,
  min_length: int = 5,
  max_length: int = 16,
  profile_fraction: float = 0.6,
  reuse: bool = False,
) -> Path:
  """Write a synthetic dataset in the JSONL format and return ``out_dir``.

  Each user gets one unsplit, time-ordered sequence of ``min_length`` to
  ``max_length`` events (so the reader splits it leave-last-out), with
  timestamps and actions; ``profile_fraction`` of users also get a profile
  (age band, occupation). ``synthetic.json`` records the generator version
  and every setting and is written last, so a matching one marks complete,
  up-to-date data.

  With ``reuse=True`` data already in ``out_dir`` is kept when its
  ``synthetic.json`` matches these settings, and regenerated (with a
  warning) otherwise. Either way a directory holding anything the generator
  did not write raises :class:`DataError` instead of being overwritten.
  """
  if num_items < len(_CATEGORIES):
    raise ValueError(f"num_items must be >= {len(_CATEGORIES)} (one per category), got {num_items}")
  if num_users < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}")
  if not 3 <= min_length <= max_length:
    raise ValueError(f"need 3 <= min_length <= max_length, got {min_length}, {max_length}")
  meta = {
    "generator": _GENERATOR,
    "version": GENERATOR_VERSION,
    "seed": seed,
    "num_items": num_items,
    "num_users": num_users,
    "min_length": min_length,
    "max_length": max_length,
    "profile_fraction": profile_fraction,
  }
  out = Path(out_dir)
  existing = _read_meta(out)
  if existing is not None:
    stale = _stale_reason(out, existing, meta)
    if stale is None and reuse:
      return out
    if stale is not None:
      log.warning("regenerating synthetic data in %s: %s", out, stale)
  out.mkdir(parents=True, exist_ok=True)
  # SIDs built for the old data would name other items: they must be rebuilt.
  (out / DERIVED_SID_FILE).unlink(missing_ok=True)
  rng = random.Random(seed)
  model = _SequenceModel()

  items = _make_catalog(rng, num_items)
  by_category: dict[str, list[int]] = {}
  for j, item in enumerate(items):
    by_category.setdefault(item.category, []).append(j)
  successor = _successors(rng, items, by_category)

  interactions: list[dict[str, Any]] = []
  for u in range(num_users):
    occupation = rng.choice(list(_OCCUPATIONS))
    favourite_categories = list(_OCCUPATIONS[occupation])
    if rng.random() < 0.3:  # some users deviate from their occupation's stereotype
      favourite_categories[rng.randrange(3)] = rng.choice(list(_CATEGORIES))
    favourite_brands = rng.sample(list(_BRANDS), 2)
    length = rng.randint(min_length, max_length)
    sequence = _user_sequence(
      rng, items, by_category, successor, favourite_categories, favourite_brands, length, model
    )
    t = _EPOCH + rng.randrange(180 * 86400)
    history = []
    for j in sequence:
      t += rng.randrange(3600, 21 * 86400)
      action = rng.choices(_ACTIONS, weights=_ACTION_WEIGHTS)[0]
      history.append({"item_id": items[j].item_id, "timestamp": t, "action": action})
    row: dict[str, Any] = {"user_id": f"U{u:05d}"}
    if rng.random() < profile_fraction:
      row["profile"] = {"age_band": rng.choice(_AGE_BANDS), "occupation": occupation}
    row["history"] = history
    interactions.append(row)

  catalog_rows = [
    {
      "item_id": it.item_id,
      "title": it.title,
      "brand": it.brand,
      "category": it.category,
      "price": it.price,
      "description": it.description,
    }
    for it in items
  ]
  # META_FILE last: until it matches, readers with reuse=True regenerate rather than read.
  _write_jsonl(out / INTERACTIONS_FILE, interactions)
  _write_jsonl(out / CATALOG_FILE, catalog_rows)
  _write_jsonl(out / META_FILE, [meta])
  return out


def ensure_synthetic(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
  """Make ``out_dir`` hold synthetic data for ``seed`` from the current generator; return it.

  This is what ``load_dataset(..., "synthetic")`` uses for cached data such
  as ``<workdir>/data``. The seed (a run's ``seed``) and :data:`GENERATOR_VERSION` must match the
  data already there, or it is regenerated with a warning. The other
  settings (``num_items`` ...) are kept from that data, so a directory made
  with ``generate_synthetic(dir, num_users=5000)`` stays that size, and are
  the defaults for a new directory.
  """
  existing = _read_meta(Path(out_dir)) or {}
  sizes = {}
  if existing.get("generator") == _GENERATOR:
    sizes = {k: existing[k] for k in _SIZE_SETTINGS if k in existing}
  return generate_synthetic(out_dir, seed=seed, reuse=True, **sizes)
