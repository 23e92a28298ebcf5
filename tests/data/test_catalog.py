"""Catalog lookups and title grounding."""

from __future__ import annotations

import pytest

from recllm_jax.data import Catalog, Example, Item, normalize_title, popularity


def _catalog() -> Catalog:
  return Catalog([
    Item("1", "Gel Pen, Blue", {"brand": "Acme"}),
    Item("2", "Stapler"),
    Item("3", "Gel  Pen, Blue "),  # same title after whitespace normalisation
    Item("4", "Gel Pen, blue"),  # case differs: a different title
  ])


def test_basic_access():
  catalog = _catalog()
  assert len(catalog) == 4
  assert "2" in catalog and "9" not in catalog
  assert catalog["1"].attributes == {"brand": "Acme"}
  assert catalog.title("2") == "Stapler"
  assert [item.item_id for item in catalog] == ["1", "2", "3", "4"]
  assert list(catalog.items) == ["1", "2", "3", "4"]
  assert Catalog(catalog.items).items == catalog.items


def test_titles_are_unique_in_catalog_order():
  assert _catalog().titles() == ["Gel Pen, Blue", "Stapler", "Gel Pen, blue"]


def test_ids_for_title_normalises_whitespace_only():
  catalog = _catalog()
  assert catalog.ids_for_title(" Gel Pen,\tBlue") == ["1", "3"]
  assert catalog.ids_for_title("Gel Pen, blue") == ["4"]
  assert catalog.ids_for_title("nope") == []
  assert normalize_title("  a \n b  ") == "a b"


def test_ground_title():
  catalog = _catalog()
  assert catalog.ground_title("Gel Pen, Blue") == "1"  # no popularity: first in catalog
  assert catalog.ground_title("Gel Pen, Blue", {"1": 2, "3": 5}) == "3"
  assert catalog.ground_title("Gel Pen, Blue", {"1": 5, "3": 5}) == "1"  # tie: catalog order
  assert catalog.ground_title("Gel Pen, Blue", {}) == "1"
  assert catalog.ground_title("Unknown") is None


def test_duplicate_ids_rejected():
  with pytest.raises(ValueError, match="duplicate item id '1'"):
    Catalog([Item("1", "a"), Item("1", "b")])


def test_popularity_counts_histories_and_targets():
  counts = popularity([Example("u", ("1", "2"), ("3",)), Example("v", ("2",), ("2", "1"))])
  assert counts == {"1": 2, "2": 3, "3": 1}
