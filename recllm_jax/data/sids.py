"""Semantic IDs (SIDs): items written as a few position-specific code tokens.

Generative recommenders in the TIGER / MiniOneRec line do not generate titles
or raw ids: each item gets a short code path such as ``<a_60><b_159><c_203>``
(level 0 uses letter ``a``, level 1 ``b``, ...), the model emits one token per
level, and a trie over all SIDs constrains decoding to real items. Similar
items share leading codes, so the first tokens carry coarse meaning and the
vocabulary stays small (``levels x codebook size`` tokens instead of one per
item). This is the exact format of the SID column of Amazon's ``info.txt``
(``<sid>\\t<title>\\t<item_id>``).

This module holds everything about SIDs that needs no model:

* the token format (:func:`sid_token`, :func:`format_sid`, :func:`parse_sid`,
  :func:`sid_tokens`);
* the file written beside a dataset (:data:`SID_FILE`, :func:`read_sid_file`,
  :func:`write_sid_file`);
* a deterministic builder (:func:`build_sids`): item embeddings from text
  (hashed TF-IDF + truncated SVD) and/or co-occurrence in training sequences
  (PPMI + truncated SVD), residual k-means (:func:`rq_kmeans`) with balanced
  clusters, then :func:`resolve_collisions` so every item has its own SID and
  no SID is a prefix of another (a trie leaf is then exactly one item).

Only numpy and scipy are used (no learned encoder, no sklearn), so SIDs can be
built offline on a CPU in seconds and are bit-for-bit reproducible for a seed.
Like :mod:`~recllm_jax.data.catalog` it imports only ``catalog`` and ``errors``
from the package.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from recllm_jax.data.catalog import Catalog
from recllm_jax.data.errors import DataError

__all__ = [
  "FEATURES",
  "SID_FILE",
  "build_sids",
  "cooccurrence_embeddings",
  "format_sid",
  "parse_sid",
  "read_sid_file",
  "resolve_collisions",
  "rq_kmeans",
  "sid_token",
  "sid_tokens",
  "text_embeddings",
  "write_sid_file",
]

log = logging.getLogger(__name__)

SID_FILE = "sids.tsv"
FEATURES = ("text", "cooc", "text+cooc")

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MAX_LEVELS = len(_LETTERS)
# A token, optionally preceded by whitespace. Codes are canonical decimals (no
# leading zeros): "<a_07>" would be a different vocabulary token from "<a_7>"
# yet parse to the same code, silently splitting one code into two tokens.
_TOKEN = re.compile(r"\s*<([a-z])_(0|[1-9][0-9]*)>")
# Hashed TF-IDF width: 2**18 buckets make collisions between the few hundred
# thousand distinct uni/bigrams of a catalog rare, and only used buckets are
# kept before the SVD, so the width costs nothing.
_HASH_BUCKETS = 2**18
_WORD = re.compile(r"[^\W_]+")
# Titles are short and descriptions long; counting title terms twice keeps a
# long description from drowning what the item is.
_TITLE_WEIGHT = 2.0


# --------------------------------------------------------------------------- format


def sid_token(level: int, code: int) -> str:
  """The token for ``code`` at ``level``: ``sid_token(0, 12) == "<a_12>"``."""
  if not 0 <= level < _MAX_LEVELS:
    raise ValueError(f"SID level must be in [0, {_MAX_LEVELS}), got {level}")
  if code < 0:
    raise ValueError(f"SID code must be >= 0, got {code}")
  return f"<{_LETTERS[level]}_{int(code)}>"


def format_sid(codes: Sequence[int]) -> str:
  """``[60, 159, 203] -> "<a_60><b_159><c_203>"`` (no separators, as in ``info.txt``)."""
  if len(codes) == 0:
    raise ValueError("a SID needs at least one code")
  return "".join(sid_token(level, int(code)) for level, code in enumerate(codes))


def parse_sid(text: str) -> tuple[int, ...]:
  """Inverse of :func:`format_sid`; whitespace around and between tokens is allowed.

  Raises ``ValueError`` naming the problem for empty text, anything that is
  not a ``<x_N>`` token, or level letters not in order ``a, b, c, ...``.
  """
  if not isinstance(text, str):
    raise ValueError(f"SID must be a string, got {type(text).__name__}")
  codes: list[int] = []
  pos = 0
  end = len(text.rstrip())
  while pos < end:
    match = _TOKEN.match(text, pos)
    if match is None:
      rest = text[pos:].strip()
      raise ValueError(
        f"malformed SID {text!r}: expected a token like <{_LETTERS[min(len(codes), _MAX_LEVELS - 1)]}_0> "
        f"at {rest[:20]!r} (codes are decimal without leading zeros)"
      )
    letter, code = match.group(1), match.group(2)
    if len(codes) == _MAX_LEVELS:
      raise ValueError(f"malformed SID {text!r}: more than {_MAX_LEVELS} levels (a..z)")
    expected = _LETTERS[len(codes)]
    if letter != expected:
      raise ValueError(
        f"malformed SID {text!r}: token {len(codes) + 1} has level letter {letter!r}, "
        f"expected {expected!r} (levels must run a, b, c, ... from the first token)"
      )
    codes.append(int(code))
    pos = match.end()
  if not codes:
    raise ValueError(f"empty SID {text!r}")
  return tuple(codes)


def sid_tokens(sids: Iterable[str]) -> tuple[str, ...]:
  """Every distinct code token used by ``sids``, sorted by (level, code).

  This is the vocabulary a tokenizer needs to add for SID generation.
  """
  used: set[tuple[int, int]] = set()
  for sid in sids:
    used.update(enumerate(parse_sid(sid)))
  return tuple(sid_token(level, code) for level, code in sorted(used))


def resolve_collisions(sids: Mapping[str, str]) -> dict[str, str]:
  """Make SIDs unique and prefix-free by giving clashing items one extra level.

  Items (keys, in mapping order) sharing a SID all get one more token, at
  the level after the SID's own last level, with codes ``0..n-1`` in mapping
  order; no member keeps the bare shared SID, which would otherwise be a
  prefix of its siblings' (a trie leaf must be exactly one item). A unique
  SID that is a proper prefix of another item's SID is extended the same way.
  Codes already used below the same prefix by longer SIDs are skipped, so
  inputs of mixed lengths cannot clash after the extension either. Other
  SIDs are unchanged (returned in canonical :func:`format_sid` form).
  """
  parsed = {key: parse_sid(sid) for key, sid in sids.items()}
  groups: dict[tuple[int, ...], list[str]] = collections.defaultdict(list)
  # Codes used directly below each proper prefix: an extension must avoid them.
  below: dict[tuple[int, ...], set[int]] = collections.defaultdict(set)
  for key, codes in parsed.items():
    groups[codes].append(key)
    for depth in range(len(codes)):
      below[codes[:depth]].add(codes[depth])
  out = {key: format_sid(codes) for key, codes in parsed.items()}
  for codes, keys in groups.items():
    if len(keys) == 1 and codes not in below:
      continue
    if len(codes) >= _MAX_LEVELS:
      raise ValueError(f"cannot extend SID {format_sid(codes)!r} past {_MAX_LEVELS} levels")
    taken = below.get(codes, set())
    free = (c for c in range(len(keys) + len(taken)) if c not in taken)
    for key, code in zip(keys, free):
      out[key] = format_sid(codes + (code,))
  return out


# --------------------------------------------------------------------------- files


def read_sid_file(path: str | os.PathLike[str]) -> dict[str, str]:
  """Read ``item_id<TAB>sid`` lines (``#`` comments and blank lines skipped).

  Raises :class:`DataError` naming ``path:line`` for a line without exactly
  two tab-separated fields, an empty or duplicate item id, or an invalid SID.
  SIDs are returned as written (whitespace-stripped); they need not be unique.
  """
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except FileNotFoundError as e:
    raise DataError("SID file not found", path=path) from e
  out: dict[str, str] = {}
  for number, line in enumerate(lines, start=1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    fields = line.split("\t")
    if len(fields) != 2:
      raise DataError(f"expected 'item_id<TAB>sid' (2 tab-separated fields), got {len(fields)}",
                      path=path, line=number)
    item_id, sid = fields[0].strip(), fields[1].strip()
    if not item_id:
      raise DataError("empty item id", path=path, line=number)
    if item_id in out:
      raise DataError(f"duplicate item id {item_id!r}", path=path, line=number, item_id=item_id)
    try:
      parse_sid(sid)
    except ValueError as e:
      raise DataError(str(e), path=path, line=number, field="sid", item_id=item_id) from e
    out[item_id] = sid
  return out


def write_sid_file(path: str | os.PathLike[str], sids: Mapping[str, str], header: str = "") -> None:
  """Write ``sids`` (mapping order) as ``item_id<TAB>sid`` lines, ``header`` as ``#`` lines first.

  The file is written to a temporary name and renamed, so a reader never
  sees half a file. Invalid SIDs and ids containing tabs or newlines raise
  ``ValueError`` before anything is written.
  """
  path = Path(path)
  lines = [f"# {line}".rstrip() for line in header.splitlines()]
  for item_id, sid in sids.items():
    if not item_id or any(c in item_id for c in "\t\r\n") or item_id.lstrip().startswith("#"):
      raise ValueError(f"item id {item_id!r} cannot be written to a SID file")
    lines.append(f"{item_id}\t{format_sid(parse_sid(sid))}")
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  os.replace(tmp, path)


# --------------------------------------------------------------------------- embeddings


def _terms(text: str) -> list[str]:
  words = _WORD.findall(text.lower())
  return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _item_fields(title: str, attributes: Mapping[str, Any]) -> list[tuple[str, float]]:
  """(text, weight) for the title and every string (or list-of-strings) attribute."""
  fields = [(title, _TITLE_WEIGHT)]
  for value in attributes.values():
    if isinstance(value, str):
      fields.append((value, 1.0))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
      fields.append((" ".join(value), 1.0))
  return fields


def _truncated_svd(matrix: scipy.sparse.csr_matrix, dim: int, seed: int, power: float) -> np.ndarray:
  """Rows of ``U * S**power`` for the top ``dim`` singular triplets, zero-padded to ``dim``.

  ARPACK with a start vector drawn from ``seed`` is deterministic; signs are
  fixed (largest entry of each column positive) because ARPACK may return
  either sign. Matrices too small for ARPACK (it needs ``dim < min(shape)``)
  use a dense SVD.
  """
  n = matrix.shape[0]
  out = np.zeros((n, dim))
  # Only used columns matter; dropping the rest shrinks hashed TF-IDF from 2**18 columns.
  used = np.unique(matrix.indices)
  matrix = matrix[:, used]
  if n == 0 or matrix.nnz == 0:
    return out
  if dim < min(matrix.shape) - 1:
    v0 = np.random.default_rng(seed).standard_normal(min(matrix.shape))
    u, s, _ = scipy.sparse.linalg.svds(matrix.astype(np.float64), k=dim, v0=v0, solver="arpack")
  else:
    u, s, _ = np.linalg.svd(matrix.toarray(), full_matrices=False)
  order = np.argsort(-s, kind="stable")[:dim]
  u, s = u[:, order], s[order]
  signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
  signs[signs == 0] = 1.0
  out[:, : u.shape[1]] = u * signs * np.maximum(s, 0.0) ** power
  return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_dim(dim: int) -> None:
  if dim < 1:
    raise ValueError(f"dim must be >= 1, got {dim}")


def text_embeddings(catalog: Catalog, dim: int = 64, seed: int = 0) -> np.ndarray:
  """``[num_items, dim]`` LSA embeddings of each item's text, catalog order, rows L2-normalised.

  The text is the title (weighted x2) plus every string attribute (brand,
  description, category; lists of strings are joined), as word unigrams and
  bigrams hashed with CRC-32 (stable across processes, unlike ``hash()``)
  into 2**18 buckets, sublinear TF x smoothed IDF, reduced by truncated SVD.
  """
  _check_dim(dim)
  rows: list[int] = []
  cols: list[int] = []
  vals: list[float] = []
  bucket: dict[str, int] = {}
  for row, item in enumerate(catalog):
    counts: dict[int, float] = collections.defaultdict(float)
    for text, weight in _item_fields(item.title, item.attributes):
      for term in _terms(text):
        b = bucket.get(term)
        if b is None:
          b = bucket[term] = zlib.crc32(term.encode("utf-8")) % _HASH_BUCKETS
        counts[b] += weight
    rows.extend([row] * len(counts))
    cols.extend(counts)
    vals.extend(counts.values())
  n = len(catalog)
  tf = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n, _HASH_BUCKETS), dtype=np.float64)
  tf.sum_duplicates()
  tf.data = 1.0 + np.log(tf.data)
  df = np.bincount(tf.indices, minlength=_HASH_BUCKETS)
  idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
  tfidf = tf.multiply(idf[None, :]).tocsr()
  norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
  tfidf = scipy.sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ tfidf
  return _normalize_rows(_truncated_svd(tfidf.tocsr(), dim, seed, power=1.0))


def cooccurrence_embeddings(
  catalog: Catalog,
  sequences: Iterable[Sequence[str]],
  dim: int = 64,
  window: int = 3,
  seed: int = 0,
) -> np.ndarray:
  """``[num_items, dim]`` embeddings from co-occurrence in ``sequences``, rows L2-normalised.

  Two items co-occur when at most ``window`` positions apart in a sequence
  (counted symmetrically; ids not in ``catalog`` are dropped). Counts are
  PPMI weighted with context-distribution smoothing (exponent 0.75, Levy et
  al. 2015, which stops rare items getting huge PMI) and reduced by
  truncated SVD to ``U * sqrt(S)``. Items that never co-occur get zero rows.
  Pass *training* sequences only, or evaluation targets leak into the SIDs.
  """
  _check_dim(dim)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  index = {item_id: i for i, item_id in enumerate(catalog.items)}
  flat: list[int] = []
  seq_of: list[int] = []
  for s, seq in enumerate(sequences):
    ids = [index[i] for i in seq if i in index]
    flat.extend(ids)
    seq_of.extend([s] * len(ids))
  n = len(catalog)
  ids_arr, seq_arr = np.asarray(flat, dtype=np.int64), np.asarray(seq_of, dtype=np.int64)
  left: list[np.ndarray] = []
  right: list[np.ndarray] = []
  for offset in range(1, window + 1):
    same = (seq_arr[:-offset] == seq_arr[offset:]) & (ids_arr[:-offset] != ids_arr[offset:])
    left.append(ids_arr[:-offset][same])
    right.append(ids_arr[offset:][same])
  a, b = np.concatenate(left or [np.zeros(0, np.int64)]), np.concatenate(right or [np.zeros(0, np.int64)])
  pairs = np.concatenate([a, b]), np.concatenate([b, a])
  counts = scipy.sparse.csr_matrix((np.ones(pairs[0].size), pairs), shape=(n, n))
  counts.sum_duplicates()
  if counts.nnz == 0:
    return np.zeros((n, dim))
  row_sum = np.asarray(counts.sum(axis=1)).ravel()
  context = np.asarray(counts.sum(axis=0)).ravel() ** 0.75
  coo = counts.tocoo()
  pmi = np.log(coo.data * context.sum() / (row_sum[coo.row] * context[coo.col]))
  keep = pmi > 0
  ppmi = scipy.sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
  return _normalize_rows(_truncated_svd(ppmi, dim, seed, power=0.5))


# --------------------------------------------------------------------------- RQ-KMeans


def _sq_distances(x32: np.ndarray, x_sq: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """``[N, k]`` squared distances in float32, computed in place (the matmul dominates).

  ``x32``/``x_sq`` are the points in float32 and their squared norms,
  computed once per level rather than once per iteration.
  """
  c32 = centers.astype(np.float32)
  d = x32 @ c32.T
  d *= -2.0
  d += (c32 * c32).sum(1)[None, :]
  d += x_sq[:, None]
  return np.maximum(d, 0.0, out=d)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
  n = x.shape[0]
  x_sq = np.einsum("ij,ij->i", x, x)

  def sq_to(idx: int) -> np.ndarray:
    # |x - c|^2 via norms and one mat-vec: k passes over [N, dim] otherwise dominate.
    return np.maximum(x_sq - 2.0 * (x @ x[idx]) + x_sq[idx], 0.0)

  chosen = [int(rng.integers(n))]
  closest = sq_to(chosen[0])
  for _ in range(1, k):
    cumulative = np.cumsum(closest)
    total = cumulative[-1]
    if total <= 0:  # every point sits on a centre already (duplicates): any point will do
      idx = int(rng.integers(n))
    else:
      idx = min(int(np.searchsorted(cumulative, rng.random() * total, side="right")), n - 1)
    chosen.append(idx)
    np.minimum(closest, sq_to(idx), out=closest)
  return x[chosen].copy()


def _balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
  """Assign each row to a column so that no column takes more than ``capacity`` rows.

  Greedy by distance, vectorised in rounds: every unassigned point proposes
  to its nearest cluster with room left, each cluster accepts its closest
  proposers up to its remaining room, and rejected points try again next
  round (their choice is full by then). Every round with a rejection fills
  a cluster, so there are at most k rounds, and ``k * capacity >= N``
  guarantees everyone gets a place. Ties break by point index.
  """
  n, k = dist.shape
  labels = np.full(n, -1, dtype=np.int64)
  room = np.full(k, capacity, dtype=np.int64)
  todo = np.arange(n)
  while todo.size:
    sub = dist[todo]
    sub[:, room == 0] = np.inf
    choice = sub.argmin(axis=1)
    best = sub[np.arange(todo.size), choice]
    order = np.lexsort((todo, best, choice))
    chosen = choice[order]
    rank = np.arange(order.size) - np.searchsorted(chosen, chosen, side="left")
    accept = rank < room[chosen]
    labels[todo[order[accept]]] = chosen[accept]
    room -= np.bincount(chosen[accept], minlength=k)
    todo = np.sort(todo[order[~accept]])
  return labels


def _kmeans(
  x: np.ndarray, k: int, rng: np.random.Generator, iters: int, balanced: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means (optionally size-constrained); returns (labels, centres of those labels)."""
  n = x.shape[0]
  capacity = -(-n // k)
  centers = _kmeans_pp(x, k, rng)
  x32 = x.astype(np.float32)
  x_sq = np.einsum("ij,ij->i", x32, x32)
  labels = np.full(n, -1, dtype=np.int64)
  for _ in range(iters):
    dist = _sq_distances(x32, x_sq, centers)
    new = _balanced_assign(dist, capacity) if balanced else dist.argmin(axis=1)
    if np.array_equal(new, labels):
      break
    labels = new
    onehot = scipy.sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sizes = np.bincount(labels, minlength=k)
    sums = onehot @ x
    nonempty = sizes > 0
    centers[nonempty] = sums[nonempty] / sizes[nonempty, None]
    empty = np.flatnonzero(~nonempty)
    if empty.size:
      # Re-seed empty clusters on the worst-fitted points so every code can be used.
      err = ((x - centers[labels]) ** 2).sum(1)
      worst = np.argsort(-err, kind="stable")[: empty.size]
      centers[empty[: worst.size]] = x[worst]
  # Centres as the means of the final clusters (a re-seeded empty one has no members).
  onehot = scipy.sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
  sizes = np.bincount(labels, minlength=k)
  means = (onehot @ x) / np.maximum(sizes, 1)[:, None]
  return labels, means[labels]


def rq_kmeans(
  x: np.ndarray,
  codebook_sizes: Sequence[int],
  *,
  seed: int = 0,
  iters: int = 20,
  balanced: bool = True,
) -> np.ndarray:
  """Residual-quantisation k-means: ``[N, len(codebook_sizes)]`` int codes.

  Level ``l`` clusters what is left of each point after subtracting the
  centroids it was assigned at levels ``0..l-1`` into ``codebook_sizes[l]``
  clusters (``N`` if fewer points). With ``balanced=True`` no cluster takes
  more than ``ceil(N / k)`` points, which spreads items over the codebook
  (plain k-means leaves many codes empty and piles popular regions into one
  code, which makes long collision groups). k-means++ seeding from
  ``np.random.default_rng(seed)`` makes the result deterministic.
  """
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"x must be a 2-D array [N, dim], got shape {x.shape}")
  sizes = [int(k) for k in codebook_sizes]
  if not sizes or any(k < 1 for k in sizes):
    raise ValueError(f"codebook_sizes must be a non-empty list of positive ints, got {list(codebook_sizes)}")
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  n = x.shape[0]
  codes = np.zeros((n, len(sizes)), dtype=np.int64)
  if n == 0:
    return codes
  rng = np.random.default_rng(seed)
  residual = x.copy()
  for level, k in enumerate(sizes):
    labels, centers = _kmeans(residual, min(k, n), rng, iters, balanced)
    codes[:, level] = labels
    residual -= centers
  return codes


# --------------------------------------------------------------------------- builder


def build_sids(
  catalog: Catalog,
  sequences: Iterable[Sequence[str]] = (),
  *,
  features: str = "text+cooc",
  num_levels: int = 3,
  codebook_size: int = 256,
  dim: int = 64,
  seed: int = 0,
) -> dict[str, str]:
  """Item id -> SID for every item of ``catalog`` (catalog order); every SID unique.

  ``features`` picks the embedding: ``"text"`` (:func:`text_embeddings`),
  ``"cooc"`` (:func:`cooccurrence_embeddings` over ``sequences``, falling
  back to the text embedding for items that never co-occur) or
  ``"text+cooc"`` (both, each half L2-normalised, weighted equally). Codes
  come from balanced :func:`rq_kmeans` with ``num_levels`` levels of
  ``codebook_size`` codes; items that still share a SID get one extra level
  (:func:`resolve_collisions`). ``sequences`` should be training sequences
  only (e.g. each training example's ``history + targets``).
  """
  if features not in FEATURES:
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
  if not 1 <= num_levels < _MAX_LEVELS:
    raise ValueError(f"num_levels must be in [1, {_MAX_LEVELS - 1}] (one level is kept for collisions), "
                     f"got {num_levels}")
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
  _check_dim(dim)
  if len(catalog) == 0:
    return {}
  start = time.perf_counter()
  text = text_embeddings(catalog, dim=dim, seed=seed)
  log.info("text embeddings: %d items x %d dims (%.1fs)", len(catalog), dim, time.perf_counter() - start)
  if features == "text":
    x = text
  else:
    start = time.perf_counter()
    cooc = cooccurrence_embeddings(catalog, sequences, dim=dim, seed=seed)
    seen = np.linalg.norm(cooc, axis=1) > 0
    log.info("co-occurrence embeddings: %d of %d items seen in sequences (%.1fs)", int(seen.sum()),
             len(catalog), time.perf_counter() - start)
    if not seen.any():
      log.warning("no item co-occurs in the given sequences; %r uses text only", features)
    if features == "cooc":
      x = np.where(seen[:, None], cooc, text)
    else:
      x = np.concatenate([text, cooc], axis=1) / math.sqrt(2.0)
  start = time.perf_counter()
  codes = rq_kmeans(x, [codebook_size] * num_levels, seed=seed)
  log.info("rq-kmeans: %d levels x %d codes (%.1fs)", num_levels, codebook_size, time.perf_counter() - start)
  raw = {item_id: format_sid(row) for item_id, row in zip(catalog.items, codes.tolist())}
  return resolve_collisions(raw)
