"""Semantic IDs: token format, collision resolution, files, the RQ-KMeans builder and its CLI."""

from __future__ import annotations

import math
import random
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data.catalog import Catalog, Item
from recllm_jax.data.errors import DataError
from recllm_jax.data.sids import (
  SID_FILE,
  build_sids,
  cooccurrence_embeddings,
  format_sid,
  parse_sid,
  read_sid_file,
  resolve_collisions,
  rq_kmeans,
  sid_token,
  sid_tokens,
  text_embeddings,
  write_sid_file,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build_sids.py"
OFFICE_INFO = REPO.parent / "shared" / "data" / "amazon18" / "Office_Products" / "info.txt"
sys.path.insert(0, str(REPO / "scripts"))

import build_sids as cli  # noqa: E402

_CATEGORIES = {
  "pens": ["ballpoint", "gel", "fountain", "marker", "highlighter"],
  "paper": ["copy", "notebook", "sticky", "cardstock", "legal"],
  "ink": ["cartridge", "toner", "black", "color", "refill"],
  "binders": ["ring", "view", "heavy", "pocket", "divider"],
}
_BRANDS = ["Acme", "Bolt", "Crest", "Dune"]


def _catalog(num_items: int = 240, seed: int = 0) -> tuple[Catalog, list[str]]:
  """A catalog with category structure in its text, and each item's category."""
  rng = random.Random(seed)
  items, categories = [], []
  names = sorted(_CATEGORIES)
  for i in range(num_items):
    category = names[i % len(names)]
    words = rng.sample(_CATEGORIES[category], 3)
    brand = rng.choice(_BRANDS)
    title = f"{brand} {' '.join(words)} {category} pack of {rng.choice([1, 2, 5, 10])}"
    items.append(Item(f"i{i}", title, {"brand": brand, "categories": [category, words[0]], "price": 1.5}))
    categories.append(category)
  return Catalog(items), categories


def _sequences(catalog: Catalog, categories: list[str], num: int = 150, seed: int = 0) -> list[list[str]]:
  """Users browse within one category, so co-occurrence carries the category too."""
  rng = random.Random(seed)
  ids = list(catalog.items)
  by_category: dict[str, list[str]] = {}
  for item_id, category in zip(ids, categories):
    by_category.setdefault(category, []).append(item_id)
  return [rng.sample(by_category[rng.choice(sorted(by_category))], 6) for _ in range(num)]


def _prefix_free(sids: list[str]) -> bool:
  codes = sorted(parse_sid(s) for s in sids)
  return len(set(codes)) == len(codes) and not any(b[: len(a)] == a for a, b in zip(codes, codes[1:]))


# --------------------------------------------------------------------------- format


def test_format_parse_round_trip():
  assert sid_token(0, 12) == "<a_12>"
  assert sid_token(3, 0) == "<d_0>"
  assert format_sid([60, 159, 203]) == "<a_60><b_159><c_203>"
  for codes in [(0,), (60, 159, 203), (1, 2, 3, 4), tuple(range(26))]:
    assert parse_sid(format_sid(codes)) == codes
  assert parse_sid("  <a_1> <b_2>\t<c_3>\n") == (1, 2, 3)


@pytest.mark.parametrize("text, message", [
  ("", "empty"),
  ("   ", "empty"),
  ("<b_1>", "expected 'a'"),
  ("<a_1><c_2>", "expected 'b'"),
  ("<a_1><a_2>", "expected 'b'"),
  ("a_1", "malformed"),
  ("<a_1>x", "malformed"),
  ("<a_1><b_2", "malformed"),
  ("<a_07>", "leading zeros"),
  ("<A_1>", "malformed"),
  ("<a_-1>", "malformed"),
  ("<a_1>,<b_2>", "malformed"),
])
def test_parse_rejects_malformed(text, message):
  with pytest.raises(ValueError, match=message):
    parse_sid(text)


def test_token_and_format_errors():
  with pytest.raises(ValueError, match="level"):
    sid_token(26, 0)
  with pytest.raises(ValueError, match="code"):
    sid_token(0, -1)
  with pytest.raises(ValueError, match="at least one"):
    format_sid([])


def test_sid_tokens_sorted_by_level_then_code():
  sids = ["<a_10><b_2>", "<a_2><b_10>", "<a_2><b_2><c_0>"]
  assert sid_tokens(sids) == ("<a_2>", "<a_10>", "<b_2>", "<b_10>", "<c_0>")


# --------------------------------------------------------------------------- collisions


def test_resolve_collisions_hand_computed():
  sids = {
    "x": "<a_1><b_2>",
    "z": "<a_1><b_3>",
    "y": "<a_1> <b_2>",  # same SID, other spelling
    "u": "<a_0><b_0>",
    "w": "<a_1><b_2>",
  }
  out = resolve_collisions(sids)
  assert out == {
    "x": "<a_1><b_2><c_0>",
    "z": "<a_1><b_3>",
    "y": "<a_1><b_2><c_1>",
    "u": "<a_0><b_0>",
    "w": "<a_1><b_2><c_2>",
  }
  assert list(out) == list(sids)
  assert _prefix_free(list(out.values()))
  assert resolve_collisions(out) == out  # already unique and prefix-free: unchanged


def test_resolve_collisions_mixed_lengths():
  # p, q share <a_1>, which r extends with <b_0>: the extension skips code 0 at level b.
  # s is unique but a prefix of t, so it is extended too; t's own code 0 is skipped.
  sids = {"p": "<a_1>", "q": "<a_1>", "r": "<a_1><b_0>", "s": "<a_5><b_0>", "t": "<a_5><b_0><c_0>"}
  out = resolve_collisions(sids)
  assert out == {
    "p": "<a_1><b_1>",
    "q": "<a_1><b_2>",
    "r": "<a_1><b_0>",
    "s": "<a_5><b_0><c_1>",
    "t": "<a_5><b_0><c_0>",
  }
  assert _prefix_free(list(out.values()))


# --------------------------------------------------------------------------- files


def test_sid_file_round_trip(tmp_path):
  sids = {"b": "<a_1><b_2>", "a": "<a_0><b_5><c_1>", "item 3": "<a_7>"}
  path = tmp_path / SID_FILE
  write_sid_file(path, sids, header="built for a test\nseed=0")
  text = path.read_text(encoding="utf-8")
  assert text.splitlines()[:3] == ["# built for a test", "# seed=0", "b\t<a_1><b_2>"]
  assert read_sid_file(path) == sids
  assert list(read_sid_file(path)) == ["b", "a", "item 3"]
  assert [p.name for p in tmp_path.iterdir()] == [SID_FILE]  # no temporary file left
  with pytest.raises(ValueError, match="cannot be written"):
    write_sid_file(path, {"a\tb": "<a_1>"})
  with pytest.raises(ValueError, match="malformed"):
    write_sid_file(path, {"a": "<a_1>x"})


@pytest.mark.parametrize("line, message", [
  ("c<a_3>", "2 tab-separated fields"),
  ("c\t<a_3>\textra", "2 tab-separated fields"),
  ("c\t<b_3>", "expected 'a'"),
  ("\t<a_3>", "empty item id"),
  ("a\t<a_3>", "duplicate item id 'a'"),
])
def test_read_sid_file_errors_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.tsv"
  path.write_text(f"# header\n\na\t<a_1><b_2>\n{line}\n", encoding="utf-8")
  with pytest.raises(DataError, match=message) as info:
    read_sid_file(path)
  assert info.value.path == str(path) and info.value.line == 4
  assert str(info.value).startswith(f"{path}:4: ")


@pytest.mark.skipif(not OFFICE_INFO.is_file(), reason="Amazon Office_Products info.txt not available")
def test_office_info_collisions_resolved():
  ref = cli.read_info_file(OFFICE_INFO)
  assert len(ref) == 3459
  codes = [parse_sid(s) for s in ref.values()]
  assert {len(c) for c in codes} == {3}
  assert len(codes) - len(set(codes)) == 15  # 15 colliding pairs
  out = resolve_collisions(ref)
  assert list(out) == list(ref)
  assert _prefix_free(list(out.values()))
  extended = [i for i in ref if out[i] != ref[i]]
  assert len(extended) == 30 and all(out[i].startswith(ref[i]) for i in extended)
  assert {out[i][len(ref[i]):] for i in extended} == {"<d_0>", "<d_1>"}


# --------------------------------------------------------------------------- embeddings and k-means


def test_embeddings_shape_norm_and_structure():
  catalog, categories = _catalog()
  text = text_embeddings(catalog, dim=16, seed=0)
  assert text.shape == (len(catalog), 16)
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(text, text_embeddings(catalog, dim=16, seed=0))
  same = np.equal.outer(categories, categories)
  sim = text @ text.T
  assert sim[same].mean() > sim[~same].mean() + 0.2

  sequences = _sequences(catalog, categories)
  sequences.append(["i0", "not-in-catalog", "i4"])  # unknown ids are dropped
  cooc = cooccurrence_embeddings(catalog, sequences, dim=16, seed=0)
  assert cooc.shape == (len(catalog), 16)
  seen = {i for seq in sequences for i in seq}
  norms = np.linalg.norm(cooc, axis=1)
  for row, item_id in enumerate(catalog.items):
    assert norms[row] == pytest.approx(1.0 if item_id in seen else 0.0, abs=1e-6)
  sim = cooc @ cooc.T
  assert sim[same & (norms[:, None] > 0)].mean() > sim[~same].mean() + 0.2
  # More dims than items: the dense SVD path pads with zeros.
  small = Catalog(list(catalog)[:5])
  assert text_embeddings(small, dim=16).shape == (5, 16)
  assert not cooccurrence_embeddings(small, []).any()


def test_rq_kmeans_balanced_sizes_and_determinism():
  x = np.random.default_rng(1).standard_normal((300, 8))
  x[:150] += 5.0  # one big blob: plain k-means would pile up codes there
  codes = rq_kmeans(x, [16, 8], seed=0)
  assert codes.shape == (300, 2) and codes.dtype.kind == "i"
  for level, k in enumerate([16, 8]):
    sizes = np.bincount(codes[:, level], minlength=k)
    assert sizes.max() <= math.ceil(300 / k) and len(sizes) == k
  np.testing.assert_array_equal(codes, rq_kmeans(x, [16, 8], seed=0))
  assert not np.array_equal(codes, rq_kmeans(x, [16, 8], seed=1))
  plain = rq_kmeans(x, [16], seed=0, balanced=False)
  assert plain.max() < 16
  # Fewer points than codes: one cluster per point.
  few = rq_kmeans(x[:5], [8, 8], seed=0)
  assert sorted(few[:, 0]) == [0, 1, 2, 3, 4]
  assert rq_kmeans(np.zeros((0, 4)), [4]).shape == (0, 1)
  with pytest.raises(ValueError, match="codebook_sizes"):
    rq_kmeans(x, [0])
  with pytest.raises(ValueError, match="2-D"):
    rq_kmeans(x[0], [4])


# --------------------------------------------------------------------------- builder


@pytest.mark.parametrize("features", ["text", "cooc", "text+cooc"])
def test_build_sids_unique_and_deterministic(features):
  catalog, categories = _catalog()
  sequences = _sequences(catalog, categories)
  kwargs = dict(features=features, num_levels=2, codebook_size=8, dim=16)
  sids = build_sids(catalog, sequences, seed=0, **kwargs)
  assert list(sids) == list(catalog.items)
  assert _prefix_free(list(sids.values()))
  assert all(len(parse_sid(s)) in (2, 3) for s in sids.values())
  assert build_sids(catalog, sequences, seed=0, **kwargs) == sids
  assert build_sids(catalog, sequences, seed=1, **kwargs) != sids
  level0 = [parse_sid(s)[0] for s in sids.values()]
  assert max(np.bincount(level0)) <= math.ceil(len(catalog) / 8)


@pytest.mark.parametrize("kwargs, name", [
  (dict(features="titles"), "features"),
  (dict(num_levels=0), "num_levels"),
  (dict(num_levels=26), "num_levels"),
  (dict(codebook_size=0), "codebook_size"),
  (dict(dim=0), "dim"),
])
def test_build_sids_bad_arguments(kwargs, name):
  catalog, _ = _catalog(20)
  with pytest.raises(ValueError, match=name):
    build_sids(catalog, **kwargs)


# --------------------------------------------------------------------------- CLI


def test_comparison_metrics():
  a, b = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
  assert cli.nmi(a, b) == pytest.approx(0.8)
  assert cli.ari(a, b) == pytest.approx(0.5714285714285715)
  assert cli.nmi(a, 5 - a) == pytest.approx(1.0) and cli.ari(a, 5 - a) == pytest.approx(1.0)
  # x and y share a built prefix and a reference prefix: agreement 1 each. z and w share no
  # built prefix with anyone, so all three others are their neighbours; one (each other)
  # shares their reference prefix <a_6>: 1/3 each.
  built = {"x": (0, 0), "y": (0, 1), "z": (1, 0), "w": (2, 0)}
  ref = {"x": (5, 0), "y": (5, 1), "z": (6, 0), "w": (6, 1)}
  agree, chance = cli.neighbour_agreement(built, ref)
  assert agree == pytest.approx((1 + 1 + 1 / 3 + 1 / 3) / 4)
  assert chance == pytest.approx(1 / 3)


def test_script_end_to_end(tmp_path):
  from recllm_jax.data.synthetic import generate_synthetic

  data = generate_synthetic(tmp_path / "data", num_items=120, num_users=80, seed=0)
  flags = ["--levels", "2", "--codebook_size", "8", "--dim", "16"]
  run = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(data), *flags],
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  sids = read_sid_file(data / SID_FILE)
  assert len(sids) == 120 and _prefix_free(list(sids.values()))
  assert (data / SID_FILE).read_text(encoding="utf-8").startswith("# ")
  assert "features=text+cooc levels=2 codebook_size=8 dim=16 seed=0" in (data / SID_FILE).read_text()
  assert "collisions before resolution" in run.stdout and "s] built 120 SIDs" in run.stdout

  # Same settings compared with the first build: identical partitions and neighbours.
  out = tmp_path / "again.tsv"
  run = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(data), "--format", "jsonl",
                        "--out", str(out), "--compare", str(data), *flags],
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert read_sid_file(out) == sids
  assert "NMI 1.0000, ARI 1.0000" in run.stdout and "neighbour agreement: 1.0000" in run.stdout


@pytest.mark.parametrize("argv, message", [
  (["--data_dir", "/does/not/exist"], "is not a directory"),
  (["--data_dir", ".", "--levels", "0"], "--levels"),
  (["--data_dir", ".", "--features", "titles"], "--features"),
  (["--data_dir", ".", "--valid_fraction", "1.5"], "--valid_fraction: must be in [0, 1), got 1.5"),
  (["--data_dir", ".", "--bogus"], "unrecognized arguments"),
])
def test_script_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_script_help():
  run = subprocess.run([sys.executable, str(SCRIPT), "-h"], capture_output=True, text=True, check=False)
  assert run.returncode == 0 and "--compare" in run.stdout


def test_script_builds_from_the_runs_own_amazon18_training_split(tmp_path, capsys):
  """--valid_fraction/--valid_holdout: co-occurrence never sees the rows a run holds out."""
  from recllm_jax.data.amazon18 import read_amazon18

  root = tmp_path / "amazon"
  root.mkdir()
  (root / "items.json").write_text(json.dumps({str(i): {"title": f"Item {i}"} for i in range(1, 4)}))
  header = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid\n"
  rows = [f'u{u},"[\'Item 1\', \'Item 2\']",Item 3,"[1, 2]",3,x,y\n' for u in range(40)]
  (root / "valid.csv").write_text(header + "".join(rows))
  (root / "test.csv").write_text(header + rows[0])
  held = len(read_amazon18(root, valid_fraction=0.5).valid)
  assert 0 < held < 40
  flags = ["--data_dir", str(root), "--levels", "1", "--codebook_size", "3", "--dim", "2"]
  # Each user's one row 1, 2 -> 3 gives two training sequences (1 -> 2 and 1, 2 -> 3); a user
  # whose last row is held out keeps the first (last_row) or nothing (users).
  for extra, sequences in [([], None), (["--valid_fraction", "0.5"], 2 * 40 - held),
                           (["--valid_fraction", "0.5", "--valid_holdout", "users"], 2 * (40 - held))]:
    assert cli.main(flags + extra) == 0
    out = capsys.readouterr().out
    if sequences is not None:
      assert f"; {sequences} training sequences" in out
  assert "valid_fraction=0.5 valid_holdout=users" in (root / SID_FILE).read_text()
